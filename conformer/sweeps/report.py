"""The trials of a finished sweep, sorted by the objective: an aligned console table, a CSV and a plot of the
objective against each swept parameter (conformer.sweeps.callback logs them on the sweep's parent run)."""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conformer.sweeps.runs import ChildRun
from conformer.tracking.summary import short_value

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FINISHED = "FINISHED"


@dataclass(frozen=True)
class Trial:
    """One trial: its job number, run, status, objective (None: none reported), swept values and the step at which
    its run reached the objective."""

    number: int | None
    run_id: str
    status: str
    objective: float | None
    wall_s: float | None
    values: dict[str, str]
    objective_step: int | None = None

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
                            wall, {key: overrides[key] for key in keys if key in overrides}, child.best_step))
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
    """`trials` as CSV: one column per swept key first (the values spelt as in run names: `short_value`), then
    <objective>, status, trial, wall_time_s and run_id (the columns a preview shows first)."""
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


def _sweep(spec: str | None) -> Any:
    """A search-space spec as Hydra reads it (`ChoiceSweep` for a grid's `1e-3,2e-3`, `IntervalSweep`, ...); None
    when there is none or Hydra's grammar does not read it."""
    if not spec:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"key={spec}").value()
    except Exception:  # noqa: BLE001 (any parse error: the axis is judged by the values)
        return None


def log_axis(spec: str | None, numbers: Sequence[float]) -> bool:
    """Whether a swept key's axis is logarithmic: its search space samples it on a log scale (Optuna's
    `tag(log, interval(...))`), or its values, all > 0, span more than a decade (a grid's `1e-4,1e-3,1e-2`; the
    trials' values when the space is unknown)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    swept, values = _sweep(spec), list(numbers)
    if isinstance(swept, (IntervalSweep, RangeSweep)):
        return "log" in (swept.tags or set())
    if isinstance(swept, ChoiceSweep):
        values = _as_floats([str(v) for v in swept.list]) or values
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _grid(spec: str | None) -> bool:
    from hydra.core.override_parser.types import ChoiceSweep

    return isinstance(_sweep(spec), ChoiceSweep)


MAX_TICKS = 5  # labels a panel of 4.5 inches holds side by side


def objective_figure(trials: Sequence[Trial], keys: Sequence[str], objective: str,
                     space: Mapping[str, str] | None = None) -> Figure | None:
    """One panel per swept key: the objective of each finished trial against that key's value (the best trial
    starred), on a log axis where `log_axis` says so (`space`: the sweep's search space, key -> spec as written),
    ticks spelt like the run names (`short_value`): at the values a grid tried, else at most 5 round ones. None
    when no trial has an objective or nothing was swept."""
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
            spec = (space or {}).get(key)
            _numeric_ticks(ax, numbers, log_axis(spec, numbers), at_values=_grid(spec))
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
    return fig


def _numeric_ticks(ax: Any, numbers: Sequence[float], log: bool, at_values: bool) -> None:
    """The x axis of a numeric key: its scale, ticks at the values a grid tried (`at_values`, up to `MAX_TICKS`),
    else at most `MAX_TICKS` round ones, labelled by `short_value`, no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if log:
        ax.set_xscale("log")
    distinct = sorted(set(numbers))
    if at_values and len(distinct) <= MAX_TICKS:
        ax.set_xticks(distinct)
    elif log:  # 1-2-5 within a decade or two, else decades
        subs = (1.0, 2.0, 5.0) if math.log10(distinct[-1] / distinct[0]) < 1.5 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(subs=subs, numticks=MAX_TICKS))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(MAX_TICKS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_value(repr(float(x)))))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_objective(trials: Sequence[Trial], keys: Sequence[str], objective: str, path: Path,
                   space: Mapping[str, str] | None = None) -> Path | None:
    """`objective_figure` as a PNG at `path`; None when it has nothing to draw."""
    fig = objective_figure(trials, keys, objective, space)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
