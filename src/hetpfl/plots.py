"""PNG plots of a run folder and of several runs together (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy_series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Per-round mean accuracy of the clients' own models and of every extra model."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("_acc_mean") and value is not None:
                name = key[: -len("_acc_mean")]
                xs, ys = series.setdefault(name, ([], []))
                xs.append(row["round"] + 1)
                ys.append(100 * value)
    return series


def plot_run(run_dir: str | Path) -> list[Path]:
    """``accuracy.png`` (mean accuracy per round) and ``partition.png`` (client × class counts)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in accuracy_series(read_metrics(run_dir)).items():
        label = "clients' own models" if name == "personalized" else f"{name} model"
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean accuracy on clients' test splits (%)")
    ax.set_title(f"{summary.get('name')} — {summary.get('algorithm')} on {summary.get('dataset')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, run_dir / "accuracy.png"))
    if "scenario" in summary:
        written.append(plot_clients_over_tasks(run_dir, summary))
    counts = np.asarray(summary.get("partition", {}).get("label_counts", []))
    if counts.size:
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * counts.shape[1] + 2), max(3, 0.22 * counts.shape[0] + 1.5)))
        image = ax.imshow(counts, aspect="auto", cmap="viridis")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.set_title(f"private samples per client and class ({summary['partition']['scheme']})")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(_save(fig, run_dir / "partition.png"))
    return written


def plot_clients_over_tasks(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``clients.png``: every client's own score per round (Self exact match), the mean on the
    other clients' tasks (Others, dotted), and the rounds where the clients switch task (dashed)."""
    rows = read_metrics(run_dir)
    rounds = [r["round"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    per_client = np.array([[np.nan if v is None else 100 * v for v in r["client_acc"]] for r in rows])
    colors = plt.cm.tab10(np.linspace(0, 1, 10))
    for client in range(per_client.shape[1]):
        ax.plot(rounds, per_client[:, client], marker=".", lw=1, color=colors[client % 10], label=f"client {client}")
    others = [100 * r["others_mean"] if r.get("others_mean") is not None else np.nan for r in rows]
    ax.plot(rounds, others, ls=":", lw=2, color="black", label="Others (mean)")
    for switch in summary["scenario"]["task_switches"]:
        ax.axvline(switch + 0.5, ls="--", color="grey", alpha=0.7)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round (dashed: task switch)")
    ax.set_ylabel("exact match on the tasks met so far (%)")
    ax.set_title(f"{summary.get('algorithm')} on hetvqa/{summary['scenario']['name']}: each client (Self)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, run_dir / "clients.png")


def plot_comparison(groups: dict[str, Sequence[str | Path]], out_path: str | Path) -> Path:
    """Mean (± std band over seeds) of the clients' own accuracy per round, one line a group (a
    kept record, summary and config alone, has no rounds to draw and is left out of the plot)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dirs in groups.items():
        curves = [accuracy_series(read_metrics(d)).get("personalized") for d in run_dirs
                  if (Path(d) / "metrics.jsonl").exists()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        length = min(len(c[0]) for c in curves)
        xs = curves[0][0][:length]
        ys = np.array([c[1][:length] for c in curves])
        ax.plot(xs, ys.mean(0), marker="o", label=label)
        if len(curves) > 1:
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("mean accuracy of clients' own models (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # kept records only: say so rather than draw empty axes under a legend warning
        ax.text(0.5, 0.5, "no run here kept its rounds (metrics.jsonl):\nsee table.md", ha="center",
                va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, Path(out_path))


def save_heatmap(path: str | Path, matrix: np.ndarray, title: str,
                 truth: tuple[np.ndarray, str] | None = None) -> Path:
    """A client × client matrix as a heatmap, beside a reference matrix (``truth``: matrix, title)."""
    panels = [(np.asarray(matrix), title)] + ([truth] if truth is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
    for ax, (values, name) in zip(np.atleast_1d(axes), panels):
        image = ax.imshow(values, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ticks = range(0, values.shape[0], max(1, values.shape[0] // 10))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("client j")
        ax.set_ylabel("client i")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, Path(path))


def _save(fig: "plt.Figure", path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_image_grid(path: str | Path, images: np.ndarray, value_range: tuple[float, float] | None = None,
                    row_labels: Sequence[str] | None = None, title: str = "") -> Path:
    """Save ``images`` of shape (rows, cols, C, H, W) as one PNG grid (one row per e.g. client),
    pixels mapped from ``value_range`` (default: the images' own min and max) to [0, 1]."""
    images = np.asarray(images, dtype=np.float32)
    rows, cols = images.shape[:2]
    low, high = value_range if value_range is not None else (float(images.min()), float(images.max()))
    images = np.clip((images - low) / max(high - low, 1e-8), 0.0, 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8 + 1.0, rows * 0.8 + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = images[r, c]
            ax.imshow(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)),
                      cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))
