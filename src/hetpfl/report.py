"""Compare finished runs: a table of mean ± std over seeds, and combined plots."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .plots import plot_comparison
from .runfolder import STATUS, problem


def find_runs(paths: Iterable[str | Path], skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Finished run folders at or below each path, sorted. A folder whose run did not complete, or
    whose files are not the ones its run wrote (:func:`hetpfl.runfolder.problem`), is left out and
    appended to ``skipped`` with the reason."""
    candidates: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        for marker in ("summary.json", STATUS):
            if (path / marker).exists():
                candidates.add(path)
            else:
                candidates.update(p.parent for p in path.rglob(marker))
    found = []
    for run_dir in sorted(candidates):
        reason = problem(run_dir)
        if reason is None:
            found.append(run_dir)
        elif skipped is not None:
            skipped.append((run_dir, reason))
    if not found:
        raise FileNotFoundError(f"no finished run folders under: {', '.join(map(str, paths))}"
                                + "".join(f"; {d}: {why}" for d, why in (skipped or [])[:5]))
    return found


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Runs that differ only by seed form one group, keyed by name/algorithm/dataset."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for run_dir in run_dirs:
        s = load_summary(run_dir)
        groups[f"{s['name']} [{s['algorithm']}, {s['dataset']}]"].append(run_dir)
    return dict(groups)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def best_cluster_model(final: dict[str, Any]) -> dict[str, float]:
    """``best_cluster_test_acc``: the best single cluster model (``cluster<k>_test_acc``) of a run on the
    global test set, to set a shared model against; empty for a run without cluster models."""
    scores = [v for k, v in final.items() if re.fullmatch(r"cluster\d+_test_acc", k) and isinstance(v, (int, float))]
    return {"best_cluster_test_acc": max(scores)} if scores else {}


def summarize_groups(groups: dict[str, list[Path]]) -> list[dict[str, Any]]:
    """One row per group: every ``final`` measure as mean ± std over its runs (seeds)."""
    rows = []
    for label, run_dirs in groups.items():
        summaries = [load_summary(d) for d in run_dirs]
        row: dict[str, Any] = {
            "group": label,
            "name": summaries[0]["name"],
            "algorithm": summaries[0]["algorithm"],
            "dataset": summaries[0]["dataset"],
            "seeds": sorted(s["seed"] for s in summaries),
        }
        finals = [{**s["final"], **best_cluster_model(s["final"])} for s in summaries]
        measures = sorted({k for f in finals for k, v in f.items() if isinstance(v, (int, float))})
        for key in measures:
            values = [f[key] for f in finals if isinstance(f.get(key), (int, float))]
            row[key] = _mean_std(values)
        for key in ("bytes_up_per_client_mean", "bytes_down_per_client_mean", "bytes_up_total",
                    "bytes_down_total", "wall_time_s"):
            row[key] = _mean_std([s[key] for s in summaries])
        server_keys = sorted({k for s in summaries for k in s.get("server", {})})
        for key in server_keys:
            row[f"server.{key}"] = _mean_std([s["server"][key] for s in summaries if key in s.get("server", {})])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """A fixed set of columns (accuracies in %, bytes in MB per client per run, seconds): own models,
    every extra model on the clients' splits (``*_acc_mean``) and on the global test set
    (``*_test_acc``), a method's own evaluate scalars (other ``*_mean``: HetVQA's Others, token F1,
    forgetting, fast adaptation), the clustering's ARI when a method reports one."""
    acc_keys = ["personalized_acc_mean", "personalized_acc_worst10"]
    extra = sorted({k for r in rows for k in r if k.endswith("_acc_mean") and k not in acc_keys})
    # on the global test set; numbered models (one per cluster: cluster0, cluster1...) stay in table.json
    # (their best, ``best_cluster_test_acc``, is shown)
    test_set = sorted({k for r in rows for k in r if k.endswith("_test_acc") and not k[: -len("_test_acc")][-1].isdigit()})
    ari = ["cluster_ari"] if any("cluster_ari" in r for r in rows) else []
    # a method's own evaluate scalars (HetVQA: others, token_f1, forgetting, zeroshot_/adapt_<kind>)
    scalars = sorted({k for r in rows for k in r if k.endswith("_mean") and not k.endswith("_acc_mean")
                      and not k.startswith(("bytes_", "server."))})
    headers = ["run", "seeds", "own model acc %", "worst-10% acc %"] + [
        f"{k[: -len('_acc_mean')]} model acc %" for k in extra
    ] + [f"{k[: -len('_test_acc')]} test-set acc %" for k in test_set] + [f"{k[: -len('_mean')]} %" for k in scalars] + (
        ["cluster ARI"] if ari else []) + ["MB up/client", "MB down/client", "wall s"]
    lines = []
    for r in rows:
        cells = [r["group"], str(len(r["seeds"]))]
        for key in acc_keys + extra + test_set + scalars:
            cells.append(_pct(r.get(key)))
        cells += [f"{r['cluster_ari'][0]:.2f} ± {r['cluster_ari'][1]:.2f}" if "cluster_ari" in r else "—"
                  for _ in ari]
        cells.append(_mb(r["bytes_up_per_client_mean"]))
        cells.append(_mb(r["bytes_down_per_client_mean"]))
        cells.append(f"{r['wall_time_s'][0]:.1f}")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in lines])


def _pct(value: tuple[float, float] | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def _mb(value: tuple[float, float]) -> str:
    return f"{value[0] / 1e6:.3f}"


def report(paths: Iterable[str | Path], out_dir: str | Path | None = None, markdown: bool = False,
           skipped: list[tuple[Path, str]] | None = None) -> str:
    """Build the comparison table; write ``comparison.png`` and ``table.md``/``table.json`` to ``out_dir``.
    Folders left out (unfinished, failed, altered) are appended to ``skipped`` with the reason."""
    run_dirs = find_runs(paths, skipped)
    groups = group_runs(run_dirs)
    rows = summarize_groups(groups)
    table = format_table(rows, markdown=markdown)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_comparison({k: v for k, v in groups.items()}, out / "comparison.png")
        (out / "table.md").write_text(format_table(rows, markdown=True) + "\n")
        (out / "table.json").write_text(json.dumps(rows, indent=2))
    return table
