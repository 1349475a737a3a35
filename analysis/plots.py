"""PNG figures of a run (matplotlib, Agg canvas; no pyplot global state)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.load import Run
from analysis.tables import (
    accuracy_matrix,
    accuracy_vs_bytes,
    per_device_bytes,
    rank_report,
    traffic_per_round,
)


def _figure(size: tuple[float, float] = (6.0, 4.5)) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out


def plot_accuracy_matrix(run: Run, path: str | Path) -> Path:
    """Heat-map of ``R[i][j]`` (accuracy on task j after training task i), cells annotated."""
    table = accuracy_matrix(run)
    n_rows, n_cols = table.shape
    fig = _figure((1.2 * n_cols + 3.0, 1.0 * n_rows + 2.0))
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(table.to_numpy()), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto"
    )
    for i in range(n_rows):
        for j in range(n_cols):
            value = table.iat[i, j]
            text = "–" if np.isnan(value) else f"{value:.2f}"
            color = "white" if not np.isnan(value) and value <= 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(n_cols), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(n_rows), table.index)
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{run.name}: accuracy matrix")
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_rank_allocation(run: Run, path: str | Path) -> Path:
    """Grouped bars: active rank per layer (x) for each task (one bar colour per task)."""
    report = rank_report(run)
    layers = list(dict.fromkeys(report["layer"]))
    tasks = list(dict.fromkeys(report["task"]))
    fig = _figure((max(6.0, 0.5 * len(layers) * max(1, len(tasks)) + 2.0), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(tasks))
    x = np.arange(len(layers))
    for t, task in enumerate(tasks):
        rows = report[report["task"] == task].set_index("layer")["active_rank"]
        heights = rows.reindex(layers).astype(float).to_numpy()
        ax.bar(x + (t - (len(tasks) - 1) / 2) * width, heights, width, label=task)
    ax.set_xticks(x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("active rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{run.name}: rank allocation")
    if tasks:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_bytes(runs: Iterable[Run], path: str | Path) -> Path:
    """Per round: cumulative total bytes (x) vs mean aggregated accuracy over tasks (y)."""
    fig = _figure()
    ax = fig.add_subplot()
    for run in runs:
        series = accuracy_vs_bytes(run).dropna(subset=["mean_accuracy"])
        label = f"{run.name} ({run.method})" if run.method else run.name
        ax.plot(series["cumulative_bytes"] / 1e6, series["mean_accuracy"], marker="o", label=label)
    ax.set_xlabel("cumulative traffic (MB)")
    ax.set_ylabel("mean accuracy")
    ax.set_title("accuracy vs communication")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_traffic_per_round(run: Run, path: str | Path) -> Path:
    """Stacked bars of down (server→device) and up (device→server) bytes per round."""
    table = traffic_per_round(run)
    fig = _figure()
    ax = fig.add_subplot()
    rounds = table.index.to_numpy()
    down = table["down"].to_numpy() / 1e6
    up = table["up"].to_numpy() / 1e6
    ax.bar(rounds, down, label="down (server→device)")
    ax.bar(rounds, up, bottom=down, label="up (device→server)")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes (MB)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{run.name}: traffic per round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_device_bytes(run: Run, path: str | Path) -> Path:
    """Histogram over devices of their total bytes (both directions)."""
    table = per_device_bytes(run)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(table["total"].to_numpy() / 1e6, bins=min(30, max(5, len(table) // 2)))
    ax.set_xlabel("bytes per device (MB, up + down)")
    ax.set_ylabel("devices")
    ax.set_title(f"{run.name}: traffic per device")
    return _save(fig, path)
