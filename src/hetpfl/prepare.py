"""From a validated config to a runnable :class:`~hetpfl.engine.RunSpec`: load and partition the
data, assign architectures, check that everything fits — all before any training.

Both sides of a federation use it: the experiment layer (and a Flower ServerApp) prepares the whole
run; a Flower ClientApp, which receives only the experiment's YAML, rebuilds it with
:func:`run_from_yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sys
from pathlib import Path

import yaml

from .adversaries import DATA_ATTACKS, choose_adversaries, flip_labels
from .algorithms import get_algorithm
from .config import ExperimentConfig, load_config
from .configuration import ConfigError, FieldError, build_dataclass, require
from .data import HETVQA, DatasetFormatError, build_federated_data, load_dataset
from .kernels import set_kernels
from .engine import RunSpec, assign_architectures
from .models import ModuleSpec, build_module, count_flops, count_parameters


@dataclass
class Prepared:
    """A validated experiment, ready to run: its config, its run spec, and per-client facts."""

    config: ExperimentConfig
    run: RunSpec
    clients: list[dict[str, Any]]
    setup: dict[str, Any] = field(default_factory=dict)  # facts of the method's one-time setup_run


def prepare(config: ExperimentConfig) -> Prepared:
    """Load data, partition, assign architectures and check that everything fits, before training."""
    spec = get_algorithm(config.algorithm["name"])
    set_kernels(config.runtime.kernels)  # every module and optimizer of the run follows it (hetpfl.kernels)
    d = config.data
    wanted = "vqa" if d.dataset == HETVQA else "classification"
    if spec.task_kind != wanted:
        raise ConfigError(f"algorithm.name={spec.name!r}: a {spec.task_kind} method cannot run on data.dataset="
                          f"{d.dataset!r} ({wanted}); methods for it: {', '.join(_methods_for(wanted))}")
    if d.dataset == HETVQA:
        require(config.runtime.executor != "isolated", "runtime.executor", "isolated",
                "a runtime whose clients may share memory: HetVQA's clients share one example store")
        return _prepare_hetvqa(config, spec)
    try:
        source = load_dataset(d.dataset, d.data_dir, **d.options)
    except DatasetFormatError:
        raise  # a damaged file, not a config value: its own message names the file
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
    # The run holds the public inputs only: no code of the run (no frame, closure or gc walk) finds the labels.
    data.public = data.public.without_labels()
    run = RunSpec(
        algorithm=spec, algorithm_config=algorithm_config, training=config.client, data=data,
        client_archs=archs, seed=config.seed, rounds=config.rounds, participation=config.participation,
        eval_every=config.eval_every, compression=config.runtime.compression, leaked_public_labels=leaked,
        on_client_error=config.runtime.on_client_error,
        dropout=config.runtime.dropout, stragglers=config.runtime.stragglers, aggregation=config.aggregation,
        stateless_clients=stateless, **_safeguards(config, data),
    )
    _check_run(spec, algorithm_config, run)
    return Prepared(config=config, run=run, clients=clients)


def _safeguards(config: ExperimentConfig, data: Any) -> dict[str, Any]:
    """The run's threat settings: the attacking clients (drawn from the seed; for a data attack their
    training splits are poisoned, their test splits stay true), the privacy mechanism and the reply cap."""
    options = config.adversaries
    if options.attack == "constant_soft_labels":
        require(options.constant_class < data.num_classes, "adversaries.constant_class", options.constant_class,
                f"must name a class of {config.data.dataset} (0..{data.num_classes - 1})")
    chosen = choose_adversaries(data.num_clients, options, config.seed)
    if options.attack in DATA_ATTACKS:
        for client in chosen:
            data.client_train[client] = flip_labels(data.client_train[client], data.num_classes)
    return {"adversaries": options, "adversarial_clients": chosen, "privacy": config.privacy,
            "max_reply_bytes": int(config.runtime.max_reply_mb * 2**20)}


def _check_run(spec: Any, algorithm_config: Any, run: RunSpec) -> None:
    """The method's own check of the run (``AlgorithmSpec.check_run``), its errors naming the key."""
    if spec.check_run is None:
        return
    try:
        spec.check_run(algorithm_config, run)
    except FieldError as exc:
        raise FieldError(exc.key if "." in exc.key else f"algorithm.{exc.key}", exc.value, exc.rule) from None
    except ValueError as exc:
        raise ConfigError(f"algorithm '{spec.name}': {exc}") from None


def _methods_for(task_kind: str) -> list[str]:
    from .algorithms import ALGORITHMS  # noqa: PLC0415

    return sorted(name for name, s in ALGORITHMS.items() if s.task_kind == task_kind)


def _prepare_hetvqa(config: ExperimentConfig, spec: Any) -> Prepared:
    """A HetVQA run: the scenario's clients and models, each model's pretrained backbone (trained
    once and cached; progress on stderr), and the federated view of the scenario's examples."""
    from .backbones import pretrained_backbone  # noqa: PLC0415
    from .data.hetvqa import (  # noqa: PLC0415
        SOURCES,
        HetVQAOptions,
        build_hetvqa_data,
        load_image_pool,
        parse_scenario,
        parse_task,
        read_scenario,
        vocabulary,
    )
    from .models import VLM_ARCHITECTURES  # noqa: PLC0415

    d = config.data
    options = build_dataclass(HetVQAOptions, d.options, "data.options")
    key = "data.options.scenario"
    if isinstance(options.scenario, str):
        # the file's content replaces its path in the run's config: the results folder's config.yaml
        # and every Flower client then carry the scenario itself, wherever they run
        d.options["scenario"] = read_scenario(options.scenario, key)
        if isinstance(d.options["scenario"], dict):
            d.options["scenario"].setdefault("name", Path(options.scenario).stem)
    elif not isinstance(options.scenario, dict):
        raise FieldError(key, options.scenario, "name a scenario file (configs/hetvqa/*.yaml) or give the scenario "
                                                "as a mapping")
    scenario = parse_scenario(d.options["scenario"], VLM_ARCHITECTURES, where=key)
    require(d.num_clients == len(scenario.clients), "data.num_clients", d.num_clients,
            f"must equal the scenario's clients ({len(scenario.clients)} in {scenario.name})")
    require(config.rounds <= scenario.num_rounds, "rounds", config.rounds,
            f"at most the scenario's {scenario.num_rounds} rounds ({scenario.tasks_per_client} tasks x "
            f"{scenario.rounds_per_task} rounds per task)")
    recipe = config.models.pretrain
    named = [*scenario.task_names, *(t for tasks in scenario.unseen.values() for t in tasks)]
    sources = {parse_task(t)[0].source for t in named} | set(recipe.sources)
    pool = load_image_pool(tuple(s for s in SOURCES if s in sources), d.data_dir)
    data = build_hetvqa_data(scenario, pool, vocabulary(), train_per_task=options.train_per_task,
                             test_per_task=options.test_per_task, others_per_task=options.others_per_task,
                             adaptation_steps=options.adaptation_steps,
                             adaptation_examples=options.adaptation_examples, seed=config.seed)
    data.final_round = config.rounds - 1
    data.public = data.public.without_labels()
    archs = [c.model for c in scenario.clients]
    run = RunSpec(algorithm=spec, algorithm_config=config.algorithm_config(), training=config.client, data=data,
                  client_archs=archs, seed=config.seed, rounds=config.rounds, participation=config.participation,
                  eval_every=config.eval_every, compression=config.runtime.compression,
                  on_client_error=config.runtime.on_client_error,
                  dropout=config.runtime.dropout, stragglers=config.runtime.stragglers, aggregation=config.aggregation,
                  stateless_clients=config.runtime.client_state == "none", **_safeguards(config, data))
    if run.stateless_clients:
        raise ConfigError("runtime.client_state='none': HetVQA clients keep their replay memory and adapters between "
                          "rounds (use memory or disk)")
    _check_run(spec, run.algorithm_config, run)  # before pretraining: a bad setting fails in a second
    facts = {}
    for arch in sorted(set(archs)):
        backbone = pretrained_backbone(arch, recipe, pool=pool, progress=_pretraining_progress(arch))
        data.backbone_options[arch] = {"pretrained": backbone.pretraining["checksum"],
                                       **config.models.lora.builder_options()}
        facts[arch] = {"params": sum(p.numel() for p in backbone.parameters()),
                       "pretraining_exact_match": backbone.pretraining["test_exact_match"]}
    clients = [{"id": i, "arch": arch, "params": facts[arch]["params"], "tasks": list(scenario.clients[i].tasks),
                "n_train": len(data.client_train[i]), "n_test": len(data.client_test[i])}
               for i, arch in enumerate(archs)]
    setup = dict(spec.setup_run(run.algorithm_config, run)) if spec.setup_run is not None else {}
    return Prepared(config=config, run=run, clients=clients, setup=setup)


def _pretraining_progress(arch: str):
    """Print a line to stderr every tenth of a backbone's pretraining (it runs once, then is cached)."""
    def report(step: int, total: int, loss: float) -> None:
        if step % max(1, total // 10) == 0 or step == total:
            print(f"pretraining {arch}: {step}/{total} steps, loss {loss:.3f}", file=sys.stderr, flush=True)
    return report


def run_from_yaml(experiment_yaml: str, data_dir: str | None = None) -> RunSpec:
    """The run a Flower ClientApp rebuilds from the experiment's YAML (its own ``data_dir`` first)."""
    tree = yaml.safe_load(experiment_yaml) or {}
    if data_dir:
        tree.setdefault("data", {})["data_dir"] = str(data_dir)
    return prepare(load_config(base=tree)).run


__all__ = ["Prepared", "prepare", "run_from_yaml"]
