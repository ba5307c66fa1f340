"""The ``hetpfl`` command: run experiments, compare runs, inspect datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .configuration import ConfigError
from .numerics import portable_numerics_active, portable_numerics_supported, restart_with_portable_numerics
from .runfolder import ResultsFolderError


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: PLC0415

    from .experiment import load_config, run_experiment  # noqa: PLC0415

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.runtime:
        overrides.append(f"runtime.name={args.runtime}")
    if args.resume:
        if overrides or args.out or args.overwrite:
            raise ConfigError("--resume OUT_DIR continues that run with its own config.yaml: "
                              "drop --set, --data-dir, --runtime, -o and --overwrite")
        config_path = args.config or Path(args.resume) / "config.yaml"
        config, out_dir = load_config(config_path), Path(args.resume)
    elif args.config is None:
        raise ConfigError("hetpfl run needs a config (e.g. configs/default.yaml), or --resume OUT_DIR")
    else:
        config = load_config(args.config, overrides)
        out_dir = Path(args.out or Path("runs") / config.name)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    task = None

    def on_prepared(prepared: Any) -> None:
        nonlocal task
        data = prepared.run.data
        archs = sorted(set(prepared.run.client_archs))
        console.print(
            f"[bold]{config.name}[/]: {config.algorithm['name']} on {data.name}, {data.num_clients} clients "
            f"({', '.join(archs)}), public set {len(data.public)}, {config.rounds} rounds → {out_dir}"
        )
        progress.start()
        task = progress.add_task(config.algorithm["name"], total=config.rounds, status="")

    def on_round(row: dict[str, Any]) -> None:
        status = []
        for key, label in (("personalized_acc_mean", "own"), ("server_acc_mean", "server"), ("global_acc_mean", "global")):
            if key in row:
                status.append(f"{label} {100 * row[key]:.1f}%")
        status.append(f"↑{row['bytes_up_cum'] / 1e6:.2f}MB ↓{row['bytes_down_cum'] / 1e6:.2f}MB")
        progress.update(task, advance=1, status=" ".join(status))

    try:
        summary = run_experiment(config, out_dir, on_round=on_round, on_prepared=on_prepared,
                                 resume=bool(args.resume), overwrite=args.overwrite)
    finally:
        if task is not None:  # a run refused before it began prints its error alone
            progress.stop()
    final = summary["final"]
    console.print(
        f"done in {summary['wall_time_s']:.1f}s: own-model accuracy {100 * final.get('personalized_acc_mean', float('nan')):.2f}% "
        f"(std {100 * final.get('personalized_acc_std', float('nan')):.2f}, worst-10% "
        f"{100 * final.get('personalized_acc_worst10', float('nan')):.2f}); results in {out_dir}"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import report  # noqa: PLC0415

    out = args.out or (Path(args.runs[0]) / "report" if len(args.runs) == 1 else None)
    skipped: list[tuple[Path, str]] = []
    print(report(args.runs, out_dir=out, markdown=args.markdown, skipped=skipped))
    for run_dir, reason in skipped:
        print(f"hetpfl: left out {run_dir}: {reason}", file=sys.stderr)
    if out:
        print(f"\ncomparison.png, table.md and table.json written to {out}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """One line per results folder; exit 0 only when every run is complete and intact. A script can
    rely on it where ``flwr run`` cannot: Flower's CLI exits 0 even when the ServerApp failed."""
    from .runfolder import problem, read_status  # noqa: PLC0415

    bad = 0
    for folder in args.folders:
        path = Path(folder)
        if not path.is_dir():
            print(f"{folder}: no such results folder")
            bad += 1
            continue
        why = problem(path)
        status = read_status(path) or {}
        if why is None:
            print(f"{folder}: complete after {status.get('rounds_done', '?')} rounds ({status.get('updated', 'no status')})")
        else:
            print(f"{folder}: {why}" + (f" (last update {status['updated']})" if status.get("updated") else ""))
            bad += 1
    return 1 if bad else 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from .data import dataset_info  # noqa: PLC0415

    if args.name.lower() == "hetvqa":
        return _hetvqa_info(args.data_dir)
    info = dataset_info(args.name, args.data_dir)
    print(json.dumps(info, indent=2, default=str))
    return 0 if info.get("found", True) else 1


def _hetvqa_info(data_dir: str | None) -> int:
    """HetVQA is built from other datasets: where each source is, and where the backbones are."""
    from .backbones import backbone_dir, cached_backbones  # noqa: PLC0415
    from .data import dataset_info  # noqa: PLC0415
    from .data.hetvqa import SOURCES, TASKS  # noqa: PLC0415

    sources = {name: dataset_info(name, data_dir) for name in SOURCES}
    info = {
        "benchmark": "hetvqa (hetpfl's multi-modal, multi-task benchmark; docs/benchmarks.md)",
        "tasks": len(TASKS),
        "image_sources": {name: {"found": i.get("found", True), "origin": i.get("origin")} for name, i in sources.items()},
        "backbone_dir": str(backbone_dir()),
        "pretrained_backbones": cached_backbones(),
    }
    print(json.dumps(info, indent=2, default=str))
    return 0 if all(i.get("found", True) for i in sources.values()) else 1


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: PLC0415

    from .backbones import PretrainRecipe, backbone_path, mean_score, pretrained_backbone  # noqa: PLC0415
    from .data.hetvqa import SOURCES, load_image_pool  # noqa: PLC0415
    from .models import VLM_ARCHITECTURES  # noqa: PLC0415

    archs = list(VLM_ARCHITECTURES) if args.arch == ["all"] else args.arch
    for arch in archs:
        if arch not in VLM_ARCHITECTURES:
            raise ConfigError(f"pretrain: {arch!r} is not a vision-language model; models: all, "
                              + ", ".join(VLM_ARCHITECTURES))
    try:
        recipe = PretrainRecipe(**{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                                      ("lr", args.lr)) if v is not None},
                                sources=tuple(args.sources.split(",")) if args.sources else SOURCES)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    console = Console(stderr=True)
    pool = None
    for arch in archs:
        path = backbone_path(arch, recipe, args.seed)
        if path.exists() and not args.force:
            console.print(f"{arch}: cached at {path}")
            continue
        path.unlink(missing_ok=True)  # --force: train again, then cache the new weights
        pool = pool or load_image_pool(recipe.sources, args.data_dir)
        with Progress(TextColumn(f"[bold]{arch}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task(arch, total=recipe.steps, loss="-")

            def report(step: int, total: int, loss: float, task=task, arch=arch) -> None:
                progress.update(task, completed=step, loss=f"{loss:.3f}")
                if not console.is_terminal and (step % max(1, total // 10) == 0 or step == total):
                    console.print(f"{arch}: {step}/{total} steps, loss {loss:.3f}")  # a log sees no bar

            model = pretrained_backbone(arch, recipe, args.seed, pool=pool, use_cache=True, data_dir=args.data_dir,
                                        progress=report)
        meta = model.pretraining
        console.print(f"{arch}: {meta['seconds']}s, test exact match {100 * mean_score(meta):.1f}% "
                      f"(pretraining mix) -> {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .algorithms import ALGORITHMS  # noqa: PLC0415
    from .data import DATASETS, DRIFT_SCHEMES, PARTITIONERS  # noqa: PLC0415
    from .models import ARCHITECTURES, AUXILIARY_ARCHITECTURES, VLM_ARCHITECTURES  # noqa: PLC0415

    print("algorithms: (on array datasets)")
    for name, spec in sorted(ALGORITHMS.items()):
        if spec.task_kind == "classification":
            print(f"  {name:10s} {spec.summary}")
    print("algorithms on hetvqa (LoRA-adapted vision-language clients; docs/lora_baselines.md):")
    for name, spec in sorted(ALGORITHMS.items()):
        if spec.task_kind == "vqa":
            print(f"  {name:10s} {spec.summary}")
    print("architectures:")
    for name, arch in sorted(ARCHITECTURES.items()):
        print(f"  {name:16s} {arch.description}")
    print("  ('name@w': width multiplier w in (0, 1] for the cnn, resnet and mobilenet families)")
    print("modules methods build (generators, discriminators, teachers):")
    for name, arch in sorted(AUXILIARY_ARCHITECTURES.items()):
        print(f"  {name:20s} [{arch.kind}] {arch.description}")
    print("vision-language models (LoRA clients of the multi-modal benchmark):")
    for name, arch in VLM_ARCHITECTURES.items():
        print(f"  {name:14s} {arch.description}")
    print("datasets:    " + ", ".join(DATASETS) + "; benchmark: hetvqa (a scenario file: configs/hetvqa/)")
    print("partitions:  " + ", ".join(PARTITIONERS))
    print("drift:       " + ", ".join(DRIFT_SCHEMES))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetpfl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment described by a YAML file")
    run.add_argument("config", nargs="?", help="YAML config (see configs/)")
    run.add_argument("-o", "--out", help="results folder (default: runs/<name>); one that holds a run is refused")
    run.add_argument("--overwrite", action="store_true", help="replace the run the results folder holds")
    run.add_argument("--resume", metavar="OUT_DIR",
                     help="continue the run in OUT_DIR from its newest checkpoint (runtime.checkpoint_every > 0)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (dotted key)")
    run.add_argument("--data-dir", help="where datasets are read from (else $HETPFL_DATA_DIR, else ~/.cache/hetpfl/data)")
    run.add_argument("--runtime", help="shortcut for --set runtime.name=... (simulator, flower-sim)")
    run.add_argument("--portable-numerics", action="store_true",
                     help="pin PyTorch, MKL, oneDNN and OpenBLAS to their AVX2 paths so any x86-64 machine "
                          "gives the same bytes for a seed (restarts the command; see hetpfl.numerics)")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="compare run folders (mean ± std over seeds)")
    rep.add_argument("runs", nargs="+", help="run folders, or folders containing them")
    rep.add_argument("-o", "--out", help="where to write comparison.png and table.md")
    rep.add_argument("--markdown", action="store_true", help="print a Markdown table")
    rep.set_defaults(func=_cmd_report)
    stat = sub.add_parser("status", help="how each results folder's run ended; exit 1 unless all are complete")
    stat.add_argument("folders", nargs="+", help="results folders")
    stat.set_defaults(func=_cmd_status)
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="where a dataset is read from, and how to provide it")
    info.add_argument("name")
    info.add_argument("--data-dir")
    info.set_defaults(func=_cmd_data_info)
    pre = sub.add_parser("pretrain", help="pretrain vision-language backbones on HetVQA's mix (cached)")
    pre.add_argument("arch", nargs="+", help="vlm_* architectures, or 'all'")
    pre.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    pre.add_argument("--batch-size", type=int)
    pre.add_argument("--lr", type=float)
    pre.add_argument("--sources", help="comma-separated image sources (default: all)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--data-dir")
    pre.add_argument("--force", action="store_true", help="train again even when cached")
    pre.set_defaults(func=_cmd_pretrain)
    # parsed by hetpfl.flwr_run itself (its arguments are flwr run's); listed here for --help
    sub.add_parser("flwr-run", help="flwr run ARGS, then follow the run: exit 1 unless Flower says it completed")
    lst = sub.add_parser("list", help="registered algorithms, architectures, datasets and partitions")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flwr-run"]:  # flwr run's own arguments follow: not ours to parse
        from . import flwr_run  # noqa: PLC0415

        if {"-h", "--help"} & set(argv[1:]):
            print(f"usage: hetpfl flwr-run [APP] [SUPERLINK] [flwr run options] [--no-stream]\n\n{flwr_run.__doc__}")
            return 0
        try:
            return flwr_run.flwr_run(argv[1:])
        except (flwr_run.FlowerCliError, OSError) as exc:
            print(f"hetpfl: flwr-run: {exc}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    if getattr(args, "portable_numerics", False) and not portable_numerics_active():
        if not portable_numerics_supported():
            print("hetpfl: --portable-numerics: this processor is not x86-64 with AVX2; "
                  "the pinned paths do not exist here", file=sys.stderr)
            return 2
        restart_with_portable_numerics(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one line a user can act on; the traceback behind --debug
        if args.debug:
            raise
        if isinstance(exc, ConfigError):
            print(f"hetpfl: {'' if isinstance(exc, ResultsFolderError) else 'config error: '}{exc}", file=sys.stderr)
            return 2
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ in ("DatasetUnavailableError", "DatasetFormatError"):
            print(f"hetpfl: {exc}", file=sys.stderr)
            return 2
        print(f"hetpfl: {type(exc).__name__}: {exc} (hetpfl --debug ... shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
