"""Training curves as one PNG: a subplot per metric group (loss, lr, top-1 by head, ...)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEAD_SUFFIXES = ("_conv", "_trans", "_sum")
SUBPLOT_INCHES = (5.0, 3.6)
# Fixed margins in inches (tick labels, axis label, title) instead of `tight_layout`, which draws the whole figure
# once more to measure it: half the plot's time, paid at the end of every run.
LEFT, RIGHT, BOTTOM, TOP = 0.8, 0.2, 0.55, 0.4
GAP_ACROSS, GAP_DOWN = 0.9, 0.85  # between subplots: the next y tick labels; x label and the next title


def metric_group(key: str) -> str:
    """"val/top1_conv" -> "top1", "train/loss", "train/loss_epoch" and "val/loss" -> "loss", "lr" -> "lr": one
    subplot per group."""
    name = key.rsplit("/", 1)[-1].removesuffix("_epoch")
    for suffix in HEAD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """PNG with one subplot per metric group, each key a line over steps."""
    figure, path = curves_figure(history), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """The figure `plot_curves` writes (on its own Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_curves needs at least one metric history, got an empty mapping")
    groups: dict[str, list[str]] = {}
    for key in history:
        groups.setdefault(metric_group(key), []).append(key)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(SUBPLOT_INCHES[0] * ncols, SUBPLOT_INCHES[1] * nrows), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas attached to this figure only: no pyplot global state
    for index, (group, keys) in enumerate(groups.items(), start=1):
        ax = fig.add_subplot(nrows, ncols, index)
        for key in keys:
            steps, values = _unzip(history[key], key)
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    width, height = fig.get_size_inches()
    axes_width = (width - LEFT - RIGHT - (ncols - 1) * GAP_ACROSS) / ncols
    axes_height = (height - BOTTOM - TOP - (nrows - 1) * GAP_DOWN) / nrows
    fig.subplots_adjust(left=LEFT / width, right=1 - RIGHT / width, bottom=BOTTOM / height, top=1 - TOP / height,
                        wspace=GAP_ACROSS / axes_width, hspace=GAP_DOWN / axes_height)  # gaps: fractions of an axes
    return fig


def _unzip(points: Iterable[tuple[int, float]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for point in points:
        if len(point) != 2:
            raise ValueError(f"history[{key!r}] must hold (step, value) pairs, got {point!r}")
        steps.append(int(point[0]))
        values.append(float(point[1]))
    return steps, values
