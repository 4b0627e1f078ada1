"""The trials of a finished sweep, sorted by the objective: an aligned console table, a CSV and a plot of the
objective against each swept parameter (conformer.sweeps.callback logs them on the sweep's parent run)."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conformer.sweeps.runs import ChildRun
from conformer.tracking.summary import short_value

FINISHED = "FINISHED"


@dataclass(frozen=True)
class Trial:
    """One trial: its job number, run, status, objective (None: none reported) and swept values."""

    number: int | None
    run_id: str
    status: str
    objective: float | None
    wall_s: float | None
    values: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"


def parse_overrides(text: str) -> dict[str, str]:
    """"a.b=1 +c=x" (a run's `overrides` tag) -> {"a.b": "1", "c": "x"}."""
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs}


def _job_number(run_dir: str) -> int | None:
    name = Path(run_dir).name if run_dir else ""
    return int(name) if name.isdigit() else None


def trials_from_runs(children: Sequence[ChildRun], keys: Sequence[str]) -> list[Trial]:
    """A `Trial` per child run; its values are those of `keys` in the child's overrides."""
    trials = []
    for child in children:
        overrides = parse_overrides(child.tags.get("overrides", ""))
        wall = (child.end_ms - child.start_ms) / 1000.0 if child.end_ms and child.start_ms else None
        trials.append(Trial(_job_number(child.tags.get("run_dir", "")), child.run_id, child.status, child.best,
                            wall, {key: overrides[key] for key in keys if key in overrides}))
    return trials


def sort_trials(trials: Sequence[Trial], mode: str) -> list[Trial]:
    """Finished trials with an objective, best first (`mode` "max" or "min"); then the others by number."""
    sign = -1.0 if mode == "max" else 1.0

    def key(trial: Trial) -> tuple:
        ranked = trial.finished and trial.objective is not None and math.isfinite(trial.objective)
        return (0, sign * trial.objective, _number(trial)) if ranked else (1, 0.0, _number(trial))

    return sorted(trials, key=key)


def _number(trial: Trial) -> int:
    return trial.number if trial.number is not None else 1 << 30


def best_trial(sorted_trials: Sequence[Trial]) -> Trial | None:
    """The first of `sort_trials`' order when it finished with an objective."""
    first = sorted_trials[0] if sorted_trials else None
    return first if first is not None and first.finished and first.objective is not None else None


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """Leaf names ("optim.schedule.base_lr" -> "base_lr") when they are unique, else the full keys."""
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    unique = len(set(leaves)) == len(leaves)
    return {key: leaf if unique else key for key, leaf in zip(keys, leaves)}


def overrides_text(trial: Trial, labels: dict[str, str]) -> str:
    return " ".join(f"{labels.get(key, key)}={short_value(value)}" for key, value in trial.values.items())


def _objective_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _wall_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def format_table(trials: Sequence[Trial], objective: str, labels: dict[str, str]) -> str:
    """Aligned plain text: trial, overrides, objective, status, wall time (rows in the given order), then the
    number of trials finished, failed (and killed, if any)."""
    header = ("trial", "overrides", objective, "status", "wall time")
    rows = [("-" if t.number is None else str(t.number), overrides_text(t, labels) or "-",
             _objective_text(t.objective), t.status, _wall_text(t.wall_s)) for t in trials]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {0, 2, 4}  # numbers align right

    def line(row: Sequence[str]) -> str:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    finished, failed = sum(t.finished for t in trials), sum(t.failed for t in trials)
    killed = len(trials) - finished - failed
    rule = "-" * len(line(header))
    footer = f"{len(trials)} trials: {finished} finished, {failed} failed" + (f", {killed} killed" if killed else "")
    return "\n".join([line(header), rule, *(line(row) for row in rows), rule, footer])


def write_csv(trials: Sequence[Trial], path: Path, objective: str, keys: Sequence[str]) -> Path:
    """`trials` as CSV: one column per swept key first (the values as the sweep spelt them, long floats as run names
    show them), then <objective>, status, trial, wall_time_s and run_id (the columns a preview shows first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, objective, "status", "trial", "wall_time_s", "run_id"])
        for t in trials:
            writer.writerow([*(short_value(t.values.get(k, "")) for k in keys),
                             "" if t.objective is None else repr(t.objective), t.status,
                             "" if t.number is None else t.number,
                             "" if t.wall_s is None else f"{t.wall_s:.3f}", t.run_id])
    return path


def _as_floats(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_objective(trials: Sequence[Trial], keys: Sequence[str], objective: str, path: Path) -> Path | None:
    """PNG with one panel per swept key: the objective of each finished trial against that key's value (the best
    trial starred). None when no trial has an objective or nothing was swept."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [t for t in trials if t.finished and t.objective is not None and math.isfinite(t.objective)]
    if not scored or not keys:
        return None
    best = best_trial(trials)
    fig = Figure(figsize=(4.5 * len(keys), 3.6), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas for this figure only: no pyplot global state
    for index, key in enumerate(keys, start=1):
        ax = fig.add_subplot(1, len(keys), index)
        points = [(t.values[key], t) for t in scored if key in t.values]
        numbers = _as_floats([value for value, _ in points])
        if numbers is None:  # categorical: one position per distinct value
            categories = sorted({value for value, _ in points})
            xs = [categories.index(value) for value, _ in points]
            ax.set_xticks(range(len(categories)), categories)
        else:
            xs = numbers
            if numbers and min(numbers) > 0 and max(numbers) / min(numbers) > 20:
                ax.set_xscale("log")
        ys = [t.objective for _, t in points]
        ax.scatter(xs, ys, color="tab:blue")
        for x, (_, trial) in zip(xs, points):
            if trial is best:
                ax.scatter([x], [trial.objective], marker="*", s=200, color="tab:orange", label="best", zorder=3)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(True, alpha=0.3)
        if best in [t for _, t in points]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
