"""Hydra multirun <-> MLflow: one parent run per sweep, every trial's run nested under it.

`SweepParentCallback` (conf/config.yaml: hydra.callbacks) creates the parent when the sweep starts and writes its
id to `<sweep dir>/mlflow_parent_run_id.txt`; each trial reads it from there (`sweep_parent_run_id`, called by
run.py), which works for every launcher, in-process or not.
"""
from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from conformer.tracking import (
    Tracker,
    create_tracker,
    default_run_name,
    flatten_config,
    resolve_tracking_uri,
    run_tags,
    user_tags,
)
from conformer.tracking.store import client_for, search_all_runs

log = logging.getLogger(__name__)
PARENT_FILE = "mlflow_parent_run_id.txt"


def fail_trial(cfg: DictConfig, run_dir: Path, error: BaseException) -> float:
    """A trial that failed must not end the sweep: record it as a FAILED child run (unless its own run already is)
    and report the worst objective for `trainer.monitor_mode` to the sweeper."""
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    log.error("trial in %s failed: %s", run_dir, message)
    tracking = cfg.tracking
    root = Path(cfg.paths.root)
    if tracking.enabled:
        runs = search_all_runs(client_for(tracking, root), "attributes.status != 'RUNNING'")
        if not any(run.data.tags.get("run_dir") == str(run_dir) for run in runs):
            name = default_run_name(cfg, run_dir)
            tracker = create_tracker(tracking, root, default_run_name=name)
            tracker.start(tags=run_tags(model=cfg.model.name, data=cfg.data.name, task=cfg.task.name,
                                        run_dir=run_dir, extra={"error": message, **user_tags(cfg.get("tags"))}))
            tracker.end("FAILED")
    return float("-inf") if cfg.trainer.monitor_mode == "max" else float("inf")


def sweep_parent_run_id(sweep_dir: Path | str) -> str | None:
    """The parent run id that `SweepParentCallback` wrote into `sweep_dir`; None when there is none."""
    id_file = Path(sweep_dir) / PARENT_FILE
    return (id_file.read_text().strip() or None) if id_file.is_file() else None


class SweepParentCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun.

    on_multirun_start creates the parent (named after the sweep); on_multirun_end ends it FAILED if any trial
    failed (Hydra job status or child run status), KILLED if a trial was killed, else FINISHED. When a failed
    trial aborts the sweep before on_multirun_end, an exit hook ends the parent instead. `project_root` is the
    root the jobs use for the default store (conf/config.yaml passes paths.root).
    """

    def __init__(self, project_root: str, run_name: str | None = None) -> None:
        self.project_root = Path(project_root)
        self.run_name = run_name
        self._tracker: Tracker | None = None
        self._failed_jobs = 0

    @property
    def run_id(self) -> str | None:
        return self._tracker.run_id if self._tracker else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = OmegaConf.select(config, "tracking")
        if tracking is None or not tracking.get("enabled", True):
            return
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir", default="multirun"))
        job_name = OmegaConf.select(config, "hydra.job.name", default="sweep")
        self._tracker = Tracker(resolve_tracking_uri(tracking.get("uri"), self.project_root),
                                tracking.get("experiment_name", "conformer"),
                                run_name=self.run_name or f"{job_name}-{sweep_dir.name}")
        space = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None)
        run_id = self._tracker.start(
            params=flatten_config({"sweep": space}) if space else {},
            tags=run_tags(overrides=list(overrides or []), run_dir=sweep_dir.resolve(), extra={
                "sweep": "parent",
                "sweeper": OmegaConf.select(config, "hydra.sweeper._target_", default=None)}),
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(run_id + "\n")
        # Registered after the tracker's own hook, so it runs first (atexit is LIFO) with the sweep's status.
        atexit.register(self._finish, aborted=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self._failed_jobs += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(aborted=False)

    def _finish(self, aborted: bool) -> None:
        tracker = self._tracker
        if tracker is None or not tracker.active:
            return
        atexit.unregister(self._finish)
        status = "FAILED"
        try:
            statuses = tracker.close_children()
            failed = self._failed_jobs + statuses.count("FAILED")
            if not failed:
                status = "KILLED" if "KILLED" in statuses else "FAILED" if aborted else "FINISHED"
            tracker.set_tags({"sweep.trials": len(statuses), "sweep.failed": failed})
        finally:
            tracker.end(status)
