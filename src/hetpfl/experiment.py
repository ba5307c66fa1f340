"""Experiments: a typed config (YAML + ``key=value`` overrides) → a run → a results folder.

Everything that can be wrong with a config fails in :func:`prepare`, before any training, with a
message naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from . import __version__
from .algorithms import ALGORITHMS, get_algorithm
from .algorithms.base import ClientTraining
from .configuration import ConfigError, apply_override, build_dataclass, parse_override, require, to_plain
from .data import DATASETS, PARTITIONERS, build_federated_data, load_dataset
from .engine import RunSpec, assign_architectures
from .learn import AUGMENTATIONS, OPTIMIZERS
from .models import ARCHITECTURES, build_model, count_flops, count_parameters

RUNTIMES = ("simulator", "flower-sim")


@dataclass
class DataConfig:
    dataset: str = "digits"
    num_clients: int = 10
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5  # label skew (dirichlet, cosmos) or size skew (quantity_skew)
    min_samples: int = 10  # dirichlet: fewest private samples a client may get
    shards_per_client: int = 2  # shards: classes per client
    groups: int = 5  # cosmos: label groups (clients are split equally among them)
    mix_fraction: float = 0.1  # cosmos: share of each client's data dealt back to everyone
    public_fraction: float = 0.2  # share of each class of the training split kept as public inputs
    public_size: int | None = None  # exact public-set size (class-balanced); overrides public_fraction
    max_train_samples: int | None = None  # stratified subsample of the training split
    data_dir: str | None = None  # else $HETPFL_DATA_DIR, else the user cache
    options: dict[str, Any] = field(default_factory=dict)  # dataset options (e.g. gaussian dim)

    def __post_init__(self) -> None:
        require(self.dataset in DATASETS, "data.dataset", self.dataset, f"expected one of {', '.join(DATASETS)}")
        require(self.num_clients >= 1, "data.num_clients", self.num_clients, "must be >= 1")
        require(self.partition in PARTITIONERS, "data.partition", self.partition,
                f"expected one of {', '.join(PARTITIONERS)}")
        require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "must be > 0")
        require(self.min_samples >= 0, "data.min_samples", self.min_samples, "must be >= 0")
        require(self.shards_per_client >= 1, "data.shards_per_client", self.shards_per_client, "must be >= 1")
        require(self.groups >= 1, "data.groups", self.groups, "must be >= 1")
        require(0 <= self.mix_fraction <= 1, "data.mix_fraction", self.mix_fraction, "must be in [0, 1]")
        require(0 <= self.public_fraction < 1, "data.public_fraction", self.public_fraction, "must be in [0, 1)")
        require(self.public_size is None or self.public_size >= 1, "data.public_size", self.public_size,
                "must be >= 1 or null")
        require(self.max_train_samples is None or self.max_train_samples >= 1, "data.max_train_samples",
                self.max_train_samples, "must be >= 1 or null")

    def partition_params(self) -> dict[str, Any]:
        return {
            "iid": {},
            "dirichlet": {"alpha": self.dirichlet_alpha, "min_size": self.min_samples},
            "shards": {"classes_per_client": self.shards_per_client},
            "cosmos": {"num_groups": self.groups, "alpha": self.dirichlet_alpha, "mix_fraction": self.mix_fraction},
            "quantity_skew": {"alpha": self.dirichlet_alpha},
        }[self.partition]


@dataclass
class ModelsConfig:
    clients: list[str] = field(default_factory=lambda: ["mlp", "cnn_small"])  # architectures to mix
    proportions: list[float] | None = None  # share of clients per architecture (default: equal)

    def __post_init__(self) -> None:
        require(len(self.clients) >= 1, "models.clients", self.clients, "list at least one architecture")
        for i, arch in enumerate(self.clients):
            require(arch in ARCHITECTURES, f"models.clients[{i}]", arch,
                    f"unknown architecture (available: {', '.join(sorted(ARCHITECTURES))})")
        if self.proportions is not None:
            require(len(self.proportions) == len(self.clients), "models.proportions", self.proportions,
                    f"needs one entry per architecture in models.clients ({len(self.clients)})")
            require(all(p >= 0 for p in self.proportions) and sum(self.proportions) > 0, "models.proportions",
                    self.proportions, "entries must be >= 0 with a positive sum")


@dataclass
class RuntimeConfig:
    name: str = "simulator"  # simulator | flower-sim
    client_state: str = "memory"  # memory | disk (spill personal models to disk)
    executor: str = "sequential"
    compression: str = "none"  # none | fp16 (messages' float32 arrays travel as float16)
    # CPU threads for torch. 1 is as fast for these small models, far faster on a busy machine
    # (OpenMP threads spin), and part of reproducibility: reduction order depends on it.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        require(self.name in RUNTIMES, "runtime.name", self.name, f"expected one of {', '.join(RUNTIMES)}")
        require(self.client_state in ("memory", "disk"), "runtime.client_state", self.client_state,
                "expected memory or disk")
        require(self.executor in ("sequential",), "runtime.executor", self.executor, "expected sequential")
        require(self.compression in ("none", "fp16"), "runtime.compression", self.compression,
                "expected none or fp16")
        require(self.torch_threads >= 1, "runtime.torch_threads", self.torch_threads, "must be >= 1")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 10
    participation: float = 1.0  # fraction of clients sampled each round
    eval_every: int = 1
    algorithm: dict[str, Any] | str = field(default_factory=lambda: {"name": "fedmd"})
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    client: ClientTraining = field(default_factory=ClientTraining)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        require(0 < self.participation <= 1, "participation", self.participation, "must be in (0, 1]")
        require(self.eval_every >= 1, "eval_every", self.eval_every, "must be >= 1")
        c = self.client
        require(c.local_epochs >= 0, "client.local_epochs", c.local_epochs, "must be >= 0")
        require(c.batch_size >= 1, "client.batch_size", c.batch_size, "must be >= 1")
        require(c.lr > 0, "client.lr", c.lr, "must be > 0")
        require(c.optimizer in OPTIMIZERS, "client.optimizer", c.optimizer, f"expected one of {', '.join(OPTIMIZERS)}")
        require(c.augment in AUGMENTATIONS, "client.augment", c.augment, f"expected one of {', '.join(AUGMENTATIONS)}")
        if isinstance(self.algorithm, str):  # "algorithm: fedmd" is short for {name: fedmd}
            self.algorithm = {"name": self.algorithm}
        if not isinstance(self.algorithm, dict) or "name" not in self.algorithm:
            raise ConfigError(f"algorithm={self.algorithm!r}: expected a section with a 'name' "
                              f"(available: {', '.join(sorted(ALGORITHMS))})")
        spec = _algorithm_spec(self.algorithm["name"])
        self.algorithm = {"name": spec.name, **to_plain(self._algorithm_config())}

    def _algorithm_config(self) -> Any:
        spec = _algorithm_spec(self.algorithm["name"])
        params = {k: v for k, v in self.algorithm.items() if k != "name"}
        try:
            return build_dataclass(spec.config_cls, params, prefix="algorithm")
        except ConfigError as exc:
            raise ConfigError(f"{exc} [algorithm '{spec.name}'; to switch methods use --set algorithm={spec.name} "
                              f"to drop the previous method's keys]") from None


def _algorithm_spec(name: Any):
    try:
        return get_algorithm(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or ``base``), apply ``key=value`` overrides, validate every field."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree.update(loaded)
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    return build_dataclass(ExperimentConfig, tree, prefix="")


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
    except TypeError as exc:
        raise ConfigError(f"data.options={d.options!r}: {exc}") from None
    n_train = len(source.train) if d.max_train_samples is None else min(d.max_train_samples, len(source.train))
    require(d.num_clients <= n_train, "data.num_clients", d.num_clients,
            f"more clients than training samples ({n_train} in {d.dataset})")
    try:
        data = build_federated_data(
            source, num_clients=d.num_clients, scheme=d.partition, seed=config.seed,
            public_fraction=0.0 if d.public_size is not None else d.public_fraction, public_size=d.public_size,
            max_train_samples=d.max_train_samples, partition_params=d.partition_params(),
        )
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    if spec.uses_public and len(data.public) == 0:
        raise ConfigError(f"data.public_fraction={d.public_fraction}: algorithm '{spec.name}' needs a public set (> 0)")
    archs = assign_architectures(config.models.clients, config.models.proportions, d.num_clients, config.seed)
    if spec.homogeneous_only and len(set(archs)) > 1:
        raise ConfigError(
            f"models.clients={config.models.clients}: algorithm '{spec.name}' averages weights and needs one "
            f"architecture for every client (use a single entry, or a model-agnostic method)"
        )
    facts = {}
    for arch in sorted(set(archs)):
        try:
            model = build_model(arch, data.input_shape, data.num_classes)
        except ValueError as exc:
            raise ConfigError(f"models.clients: {exc}") from None
        facts[arch] = {"params": count_parameters(model), "flops": count_flops(model, data.input_shape)}
    clients = [
        {"id": i, "arch": arch, **facts[arch], "n_train": len(data.client_train[i]), "n_test": len(data.client_test[i]),
         **({"group": int(data.client_groups[i])} if data.client_groups is not None else {})}
        for i, arch in enumerate(archs)
    ]
    algorithm_config = config._algorithm_config()
    if getattr(algorithm_config, "uses_public_labels", False):
        # An explicit, opt-in LEAK (e.g. cosmos client_weighting=public_labels, the official code's
        # loss weights): only then do the public set's true labels reach an algorithm.
        algorithm_config.attach_public_labels(data.public.labels_for_evaluation())
    run = RunSpec(
        algorithm=spec, algorithm_config=algorithm_config, training=config.client, data=data,
        client_archs=archs, seed=config.seed, rounds=config.rounds, participation=config.participation,
        eval_every=config.eval_every, compression=config.runtime.compression,
    )
    return Prepared(config=config, run=run, clients=clients)


def execute(prepared: Prepared, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a prepared experiment on its configured runtime and return the summary."""
    runtime = prepared.config.runtime
    import torch  # noqa: PLC0415

    torch.set_num_threads(runtime.torch_threads)
    if runtime.name == "simulator":
        from .simulator import simulate  # noqa: PLC0415

        return simulate(prepared.run, client_state=runtime.client_state, executor=runtime.executor, on_round=on_round)
    from .runtimes.flower import simulate_on_flower  # noqa: PLC0415

    return simulate_on_flower(prepared, on_round=on_round)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Prepare, run, and write ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and plots.

    ``runner(prepared, on_round=...)`` runs the rounds (default :func:`execute`); the Flower
    deployment ServerApp passes its own, so a deployment writes the very same folder.
    """
    from .plots import plot_run  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = prepare(config)
    if on_prepared is not None:
        on_prepared(prepared)
    (out / "config.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
    with (out / "metrics.jsonl").open("w") as metrics, (out / "timings.jsonl").open("w") as timings:

        def record(row: dict[str, Any]) -> None:
            measures = {k: v for k, v in row.items() if k != "timing"}
            metrics.write(json.dumps(measures) + "\n")
            timings.write(json.dumps({"round": row["round"], **row.get("timing", {})}) + "\n")
            metrics.flush()
            timings.flush()
            if on_round is not None:
                on_round(row)

        summary = (runner or execute)(prepared, on_round=record)
    runtime = summary.pop("runtime", config.runtime.name)
    summary = {
        "name": config.name,
        **summary,
        "runtime": runtime,
        "setup_time_s": time.perf_counter() - started - summary["wall_time_s"],
        "clients": prepared.clients,
        "partition": {"scheme": config.data.partition, "label_counts": prepared.run.data.label_counts().tolist(),
                      "public_size": len(prepared.run.data.public)},
        "environment": {"hetpfl": __version__, "python": platform.python_version(), "numpy": np.__version__},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run(out)
    return summary


__all__ = ["ExperimentConfig", "Prepared", "execute", "load_config", "prepare", "run_experiment"]
