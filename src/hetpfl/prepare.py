"""From a validated config to a runnable :class:`~hetpfl.engine.RunSpec`: load and partition the
data, assign architectures, check that everything fits — all before any training.

Both sides of a federation use it: the experiment layer (and a Flower ServerApp) prepares the whole
run; a Flower ClientApp, which receives only the experiment's YAML, rebuilds it with
:func:`run_from_yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .algorithms import get_algorithm
from .config import ExperimentConfig, load_config
from .configuration import ConfigError, FieldError, require
from .data import build_federated_data, load_dataset
from .engine import RunSpec, assign_architectures
from .models import ModuleSpec, build_module, count_flops, count_parameters


@dataclass
class Prepared:
    """A validated experiment, ready to run: its config, its run spec, and per-client facts."""

    config: ExperimentConfig
    run: RunSpec
    clients: list[dict[str, Any]]


def prepare(config: ExperimentConfig) -> Prepared:
    """Load data, partition, assign architectures and check that everything fits, before training."""
    spec = get_algorithm(config.algorithm["name"])
    d = config.data
    try:
        source = load_dataset(d.dataset, d.data_dir, **d.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.options={d.options!r}: {exc}") from None
    n_train = len(source.train) if d.max_train_samples is None else min(d.max_train_samples, len(source.train))
    require(d.num_clients <= n_train, "data.num_clients", d.num_clients,
            f"more clients than training samples ({n_train} in {d.dataset})")
    try:
        data = build_federated_data(
            source, num_clients=d.num_clients, scheme=d.partition, seed=config.seed,
            public_fraction=0.0 if d.public_size is not None else d.public_fraction, public_size=d.public_size,
            max_train_samples=d.max_train_samples, partition_params=d.partition_params(), drift=d.drift_params(),
            feature_shift=d.feature_shift, feature_shift_groups=d.feature_shift_groups,
        )
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    if spec.uses_public and len(data.public) == 0:
        raise ConfigError(f"data.public_fraction={d.public_fraction}: algorithm '{spec.name}' needs a public set (> 0)")
    stateless = config.runtime.client_state == "none"
    if stateless and spec.stateful_clients:
        raise ConfigError(
            f"runtime.client_state='none': algorithm '{spec.name}' keeps per-client state between rounds "
            f"(personal models or layers), which a run with stateless clients forbids (use memory or disk)"
        )
    archs = assign_architectures(config.models.clients, config.models.proportions, d.num_clients, config.seed)
    if spec.homogeneous_only and len(set(archs)) > 1:
        raise ConfigError(
            f"models.clients={config.models.clients}: algorithm '{spec.name}' averages weights and needs one "
            f"architecture for every client (use a single entry, or a model-agnostic method)"
        )
    facts = {}
    for arch in sorted(set(archs)):
        try:
            model = build_module(ModuleSpec.parse(arch), data.input_shape, data.num_classes, data.input_kind)
        except ValueError as exc:
            raise ConfigError(f"models.clients: {exc}") from None
        facts[arch] = {"params": count_parameters(model), "flops": count_flops(model, data.input_shape)}
    clients = [
        {"id": i, "arch": arch, **facts[arch], "n_train": len(data.client_train[i]), "n_test": len(data.client_test[i]),
         **({"group": int(data.client_groups[i])} if data.client_groups is not None else {})}
        for i, arch in enumerate(archs)
    ]
    algorithm_config = config.algorithm_config()
    # An explicit, opt-in LEAK (e.g. cosmos client_weighting=public_labels, the official code's
    # loss weights): only then do the public set's true labels reach an algorithm.
    leaked = data.public.labels_for_evaluation() if getattr(algorithm_config, "uses_public_labels", False) else None
    run = RunSpec(
        algorithm=spec, algorithm_config=algorithm_config, training=config.client, data=data,
        client_archs=archs, seed=config.seed, rounds=config.rounds, participation=config.participation,
        eval_every=config.eval_every, compression=config.runtime.compression, leaked_public_labels=leaked,
        stateless_clients=stateless,
    )
    if spec.check_run is not None:
        try:
            spec.check_run(algorithm_config, run)
        except FieldError as exc:
            raise FieldError(exc.key if "." in exc.key else f"algorithm.{exc.key}", exc.value, exc.rule) from None
        except ValueError as exc:
            raise ConfigError(f"algorithm '{spec.name}': {exc}") from None
    return Prepared(config=config, run=run, clients=clients)


def run_from_yaml(experiment_yaml: str, data_dir: str | None = None) -> RunSpec:
    """The run a Flower ClientApp rebuilds from the experiment's YAML (its own ``data_dir`` first)."""
    tree = yaml.safe_load(experiment_yaml) or {}
    if data_dir:
        tree.setdefault("data", {})["data_dir"] = str(data_dir)
    return prepare(load_config(base=tree)).run


__all__ = ["Prepared", "prepare", "run_from_yaml"]
