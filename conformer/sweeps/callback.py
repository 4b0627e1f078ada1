"""Hydra multirun <-> MLflow: one parent run per sweep, every trial's run nested under it, a summary at the end.

`SweepParentCallback` (conf/config.yaml: hydra.callbacks) creates the parent when the sweep starts, named after
the sweep (`sweep=<name>`, else its swept keys) and the time, and writes its id to
`<sweep dir>/mlflow_parent_run_id.txt`; each trial reads it from there (`sweep_parent_run_id`, called by run.py),
which works for every launcher, in-process or not. When the sweep ends, the parent gets the best trial (metric
`best/<trainer.monitor>`, tags `best.*`), the trial counts, and the trials table (printed, and `trials.csv`),
a plot of the objective against each swept key and Optuna's `optimization_results.yaml` as artifacts. An Optuna
sweep with a stored study continues the study's parent run (conformer.sweeps.optuna_store). Hydra builds the
callback for single runs too: MLflow is imported only where a sweep needs it, so a plain run or a config error
starts fast.
"""
from __future__ import annotations

import atexit
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from conformer.models.registry import model_name

if TYPE_CHECKING:
    from conformer.tracking import Tracker

log = logging.getLogger(__name__)
PARENT_FILE = "mlflow_parent_run_id.txt"
TABLE_FILE, PLOT_FILE, OPTUNA_RESULTS = "trials.csv", "objective_vs_params.png", "optimization_results.yaml"

_failed_trials = 0  # trials of this process's sweep that failed: run.py exits non-zero after the sweep


def failed_trials() -> int:
    """How many trials of the sweep run by this process failed (fail_trial, or the parent's final count)."""
    return _failed_trials


def _count_failures(count: int) -> None:
    global _failed_trials
    _failed_trials = max(_failed_trials, count)


def fail_trial(cfg: DictConfig, run_dir: Path, error: BaseException, overrides: Sequence[str] = ()) -> float:
    """A trial that failed must not end the sweep: record it as a FAILED child run (unless its own run already is)
    and report the worst objective for `trainer.monitor_mode` to the sweeper."""
    from conformer.sweeps.outcomes import record_failure
    from conformer.tracking import create_tracker, default_run_name, run_tags, user_tags
    from conformer.tracking.store import client_for, search_all_runs

    message = f"{type(error).__name__}: {error}".splitlines()[0]
    log.error("trial in %s failed: %s", run_dir, message)
    _count_failures(_failed_trials + 1)
    record_failure(run_dir, message)
    tracking = cfg.tracking
    root = Path(cfg.paths.root)
    if tracking.enabled:
        runs = search_all_runs(client_for(tracking, root), "attributes.status != 'RUNNING'")
        if not any(run.data.tags.get("run_dir") == str(run_dir) for run in runs):
            name = default_run_name(cfg, run_dir)
            tracker = create_tracker(tracking, root, default_run_name=name)
            tracker.start(params=_trial_params(cfg), tags=run_tags(
                model=model_name(cfg.model), data=cfg.data.name, task=cfg.task.name, overrides=overrides,
                run_dir=run_dir, extra={"error": message, **user_tags(cfg.get("tags"))}))
            tracker.end("FAILED")
    return float("-inf") if cfg.trainer.monitor_mode == "max" else float("inf")


def _trial_params(cfg: DictConfig) -> dict[str, str]:
    """The params a finished trial logs, so that a failed one sits in the same columns; none when the config
    cannot even be read (the error tag says why)."""
    from conformer.runtime.hardware import world_size
    from conformer.tracking.summary import comparable_params

    try:
        return comparable_params(cfg, world_size(cfg.hardware))
    except Exception:  # noqa: BLE001 (an interpolation or a missing value: what made the trial fail)
        return {}


def sweep_parent_run_id(sweep_dir: Path | str) -> str | None:
    """The parent run id that `SweepParentCallback` wrote into `sweep_dir`; None when there is none."""
    id_file = Path(sweep_dir) / PARENT_FILE
    return (id_file.read_text().strip() or None) if id_file.is_file() else None


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: those of `hydra.sweeper.params`, then the command line's sweep overrides."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [str(key) for key in params] + [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys(keys))


def search_space(config: DictConfig) -> dict[str, str]:
    """What a sweep searches, key -> values as written: `hydra.sweeper.params`, then the command line's sweep
    overrides (a `-m` grid's `trainer.epochs=1,2`)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    space = {str(key): str(value) for key, value in params.items()}
    space.update({o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()})
    return space


def sweeper_kind(target: str | None) -> str:
    """"...BasicSweeper" -> "basic", any Optuna sweeper -> "optuna"."""
    name = (target or "").rsplit(".", 1)[-1].lower()
    return "optuna" if "optuna" in name else name.removesuffix("sweeper") or "unknown"


def sweep_name(config: DictConfig, keys: Sequence[str]) -> str:
    """The `sweep=<name>` chosen, else "sweep <swept leaf keys>"."""
    choice = OmegaConf.select(config, "hydra.runtime.choices.sweep", default=None)
    if choice:
        return str(choice)
    from conformer.tracking.summary import short_labels

    return "sweep " + ",".join(short_labels(keys).values()) if keys else "sweep"


class SweepParentCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, summarising the trials when the sweep ends.

    on_multirun_end ends the parent FINISHED when a trial finished or none failed, else FAILED (failed trials still
    make run.py exit 1). When a failed trial aborts the sweep before on_multirun_end, or Ctrl-C stops it, an exit hook
    ends (and summarises) the parent instead: FAILED, or KILLED when a trial was killed. `project_root` is the root
    the jobs use for the default store (conf/config.yaml passes paths.root).
    """

    def __init__(self, project_root: str, run_name: str | None = None) -> None:
        self.project_root = Path(project_root)
        self.run_name = run_name
        self._tracker: Tracker | None = None
        self._failed_dirs: list[str] = []  # run dirs of jobs Hydra saw fail (they may have no run)
        self._keys: list[str] = []
        self._monitor, self._mode = "val/top1_sum", "max"
        self._sweep_dir = Path("multirun")
        self._view = ""  # the runs-table view of the sweep's experiment (URL path in the MLflow UI)
        self._space: dict[str, str] = {}
        self._resumed: str | None = None  # the stored Optuna study's parent run this sweep continues

    @property
    def run_id(self) -> str | None:
        return self._tracker.run_id if self._tracker else None

    def __getstate__(self) -> dict[str, Any]:
        """A launcher that runs jobs in other processes (joblib) pickles the callbacks with each job; the parent run
        stays with this process (its tracker holds locks and threads)."""
        return {**self.__dict__, "_tracker": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir", default="multirun"))
        tracking = OmegaConf.select(config, "tracking")
        if tracking is None or not tracking.get("enabled", True):
            return
        from conformer.sweeps.runs import name_parent_uniquely, share_runs_view
        from conformer.tracking import Tracker, resolve_tracking_uri, run_tags

        self._keys = swept_keys(config)
        self._monitor = OmegaConf.select(config, "trainer.monitor", default=self._monitor)
        self._mode = OmegaConf.select(config, "trainer.monitor_mode", default=self._mode)
        name = sweep_name(config, self._keys)
        kind = sweeper_kind(OmegaConf.select(config, "hydra.sweeper._target_", default=None))
        self._tracker = tracker = Tracker(resolve_tracking_uri(tracking.get("uri"), self.project_root),
                                          tracking.get("experiment_name", "conformer"),
                                          run_name=self.run_name or f"{name} {datetime.now():%m-%d %H:%M:%S}")
        self._space = space = search_space(config)
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None)
        self._resumed = self._stored_parent(config, kind)
        run_id = tracker.start(
            params={f"sweep.{key}": value for key, value in space.items()},
            tags=run_tags(overrides=list(overrides or []), run_dir=self._sweep_dir.resolve(), extra={
                "sweep": "parent", "sweep.name": name, "sweeper": kind, "sweep.keys": ",".join(self._keys)}),
            resume_run_id=self._resumed)
        if run_id != self._resumed:  # before the trials read the parent's name
            tracker.run_name = name_parent_uniquely(tracker.uri, tracker.experiment_id, run_id, tracker.run_name)
        self._sweep_dir.mkdir(parents=True, exist_ok=True)
        (self._sweep_dir / PARENT_FILE).write_text(run_id + "\n")
        self._view = share_runs_view(tracker.uri, tracker.experiment_id, f"best/{self._monitor}", self._keys,
                                     self._mode)
        # Registered after the tracker's own hook, so it runs first (atexit is LIFO) with the sweep's status.
        atexit.register(self._finish, aborted=True)

    @staticmethod
    def _stored_parent(config: DictConfig, kind: str) -> str | None:
        """The parent run of the stored Optuna study this sweep continues (None: a new sweep)."""
        if kind != "optuna":
            return None
        from conformer.sweeps.optuna_store import stored_parent_run_id

        return stored_parent_run_id(OmegaConf.select(config, "hydra.sweeper"))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            hydra_cfg = job_return.hydra_cfg
            run_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg is not None else None
            self._failed_dirs.append(str(run_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from conformer.sweeps.outcomes import failed_in

        _count_failures(failed_in(self._sweep_dir))  # recorded by on_multirun_start
        self._finish(aborted=False)

    def _finish(self, aborted: bool) -> None:
        tracker = self._tracker
        if tracker is None or not tracker.active:
            return
        atexit.unregister(self._finish)
        status = "FAILED"
        if aborted:  # a parallel launcher's trial processes end (their runs KILLED) before the summary
            from conformer.sweeps.launch import stop_trial_processes

            stop_trial_processes()
        try:
            statuses = tracker.close_children()
            failed, finished = self._summarize(tracker)
            if aborted:
                status = "KILLED" if "KILLED" in statuses and not failed else "FAILED"
            elif finished or not failed:  # FAILED only when no trial finished (the exit status counts failures)
                status = "FINISHED"
        finally:
            tracker.end(status)

    def _summarize(self, tracker: Tracker) -> tuple[int, int]:
        """Print the trials table and log the sweep's summary on the parent. Returns how many trials of this run
        failed (a continued Optuna parent also holds the trials of earlier runs: they count in the table only) and
        how many trials finished."""
        from conformer.sweeps.report import (
            best_trial,
            format_table,
            plot_objective,
            sort_trials,
            trials_from_runs,
            write_csv,
        )
        from conformer.sweeps.runs import child_runs, ui_hint
        from conformer.tracking.summary import short_labels, short_value

        children = child_runs(tracker.uri, tracker.run_id, self._monitor, self._mode)
        trials = sort_trials(trials_from_runs(children, self._keys), self._mode)
        run_dirs = {child.tags.get("run_dir") for child in children}
        # Jobs Hydra saw fail that have no run (failed before opening one); a failed run without a run_dir tag
        # (not opened by conformer.tasks) may be one of them.
        untagged = sum(child.status == "FAILED" and not child.tags.get("run_dir") for child in children)
        runless = max(0, sum(run_dir not in run_dirs for run_dir in self._failed_dirs) - untagged)
        failed = sum(trial.failed for trial in trials) + runless
        failed_now = runless + sum(child.status == "FAILED" and not self._earlier(child.tags.get("run_dir"))
                                   for child in children)
        _count_failures(failed_now)
        print(f"\n{tracker.run_name or 'sweep'}: trials by {self._monitor} ({self._mode}), parent run "
              f"{tracker.run_id}\n{format_table(trials, self._monitor, short_labels(self._keys))}"
              + (f"\n{runless} more failed before opening a run" if runless else "")
              + (f"\ncompare them in the MLflow UI: {ui_hint(tracker.uri, self._view)}" if self._view else ""),
              flush=True)
        tracker.log_metrics({"sweep/trials": len(trials) + runless, "sweep/finished": sum(t.finished for t in trials),
                             "sweep/failed": failed}, 0)
        best = best_trial(trials)
        if best is not None:
            self._log_best(tracker, best)
            tracker.set_tags({"best.run_id": best.run_id, "best.trial": "-" if best.number is None else best.number,
                              **{f"best.{key}": short_value(value) for key, value in best.values.items()}})
        tracker.log_artifact(write_csv(trials, self._sweep_dir / TABLE_FILE, self._monitor, self._keys))
        plot = plot_objective(trials, self._keys, self._monitor, self._sweep_dir / PLOT_FILE, self._space)
        if plot is not None:
            tracker.log_artifact(plot)
        if (self._sweep_dir / OPTUNA_RESULTS).is_file():
            tracker.log_artifact(self._sweep_dir / OPTUNA_RESULTS)
        return failed_now, sum(trial.finished for trial in trials)

    def _log_best(self, tracker: Tracker, best: Any) -> None:
        """`best/<monitor>` at the step at which the winning trial reached it: in the experiment's charts the
        parent's one point lies on the winner's curve, not alone at step 0. A continued parent that logged a best
        at a later step before logs this one there too (MLflow shows the value of a metric's last step)."""
        key = f"best/{self._monitor}"
        earlier = tracker.last_step(key) if tracker.run_id == self._resumed else None
        tracker.log_metrics({key: best.objective}, max(best.objective_step or 0, earlier or 0))

    def _earlier(self, run_dir: str | None) -> bool:
        """A trial run dir outside this sweep's dir: a trial of an earlier run of a continued study."""
        return bool(run_dir) and Path(run_dir).parent != self._sweep_dir.resolve()
