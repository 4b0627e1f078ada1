"""MLflow run tracking: the only module of the project that talks to MLflow.

`Tracker` wraps one MLflow run through an explicit `MlflowClient` (no fluent global state), so several
trackers and processes never interfere. It is a context manager that always terminates its run: FINISHED
on success, KILLED on KeyboardInterrupt or SIGTERM (raised as `RunKilled` while the run is active), FAILED
otherwise. Non-rank-0 processes use `NullTracker`, which has the same methods and does nothing.

Non-finite metric values (NaN/inf) are not sent to MLflow: SQLite turns inf into 1.8e308, which flattens
every chart. Each one is dropped with a warning, and the first step at which a key went non-finite is recorded
in the tag `nonfinite.<key>`, so a diverged run stays visible in the UI.
"""
from __future__ import annotations

import atexit
import getpass
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_USER
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

log = logging.getLogger(__name__)

SWEEP_PARENT_ENV = "CONFORMER_MLFLOW_PARENT_RUN_ID"
SWEEP_PARENT_FILE = "mlflow_parent_run_id.txt"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_HEAD_SUFFIXES = ("_conv", "_trans", "_sum")


class RunKilled(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives while a run is active (the run ends KILLED)."""


# ---------------------------------------------------------------------------------------------------- store
def default_tracking_uri(project_root: Path) -> str:
    """The project's default store: a SQLite file `<project_root>/mlflow.db`."""
    return f"sqlite:///{(Path(project_root).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(uri: str | None, project_root: Path) -> str:
    """Config value `tracking.uri` if set, else env MLFLOW_TRACKING_URI, else `default_tracking_uri`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_root)


def default_artifact_root(uri: str) -> Path | None:
    """`mlruns/` next to the database file for a local SQLite store, else None (the store decides).

    MLflow would otherwise put artifacts relative to the current directory, which Hydra may change.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path == "/:memory:":
        return None
    # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> path "//abs.db" (absolute).
    db_path = Path(unquote(parsed.path[1:]))
    return db_path.resolve().parent / "mlruns"


def _experiment_location(artifact_root: str | Path, experiment_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("_") or "experiment"
    root = str(artifact_root)
    if "://" in root:
        return f"{root.rstrip('/')}/{slug}"
    return (Path(root).resolve() / slug).as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_root: str | Path | None) -> str:
    """Id of the active experiment `name`, created (artifacts under `artifact_root`) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = _experiment_location(artifact_root, name) if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it in the meantime
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {client.tracking_uri}: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set "
            "tracking.experiment_name to another name."
        )
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------------- values
def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _to_str(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _plain(node: Any) -> Any:
    """Nested containers with OmegaConf nodes resolved into plain dicts and lists."""
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        except InterpolationResolutionError as err:
            raise ValueError(f"cannot log the config: an interpolation does not resolve here ({err}); "
                             "pass a config whose interpolations resolve in this process.") from err
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    return node


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def flatten_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, str]:
    """Dotted keys ("optim.optimizer.lr") to strings.

    Interpolations are resolved, lists become JSON, empty mappings "{}", and values are truncated to MLflow's
    parameter limit.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"flatten_config expects a mapping or DictConfig, got {type(cfg).__name__}")
    flat: dict[str, Any] = {}
    for key, value in _plain(cfg).items():
        _flatten(value, str(key), flat)
    return {key: _truncate(_to_str(value), MAX_PARAM_VAL_LENGTH) for key, value in flat.items()}


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _float(key: str, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from err


# ---------------------------------------------------------------------------------------------------- tags
def git_commit(path: Path | str) -> str | None:
    """HEAD commit of the git work tree containing `path`, or None (no git, not a repository)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def run_tags(*, model: str | None = None, data: str | None = None, hardware: str | None = None,
             task: str | None = None, overrides: Sequence[str] = (), git_commit: str | None = None,
             run_dir: Path | str | None = None, world_size: int = 1,
             extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags for a run; values that are None are left out, the commit goes to MLflow's own git tag."""
    tags: dict[str, Any] = {
        "model": model, "data": data, "hardware": hardware, "task": task,
        "overrides": " ".join(overrides), MLFLOW_GIT_COMMIT: git_commit,
        "run_dir": str(run_dir) if run_dir is not None else None, "world_size": world_size,
        **(extra or {}),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


# ---------------------------------------------------------------------------------------------------- tracker
class Tracker:
    """One MLflow run, on rank 0. Use `with tracker: tracker.start(params, tags); ...`."""

    enabled = True

    def __init__(self, uri: str, experiment_name: str, run_name: str | None = None,
                 artifact_root: str | Path | None = None, parent_run_id: str | None = None) -> None:
        if not experiment_name:
            raise ValueError("tracking.experiment_name must be a non-empty string")
        self.uri = uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifact_root = artifact_root if artifact_root is not None else default_artifact_root(uri)
        self.parent_run_id = parent_run_id
        self._client = MlflowClient(tracking_uri=uri)
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._artifact_uri: str | None = None
        self._active = False
        self._old_sigterm: Any = None
        self._sigterm_installed = False
        self._nonfinite: set[str] = set()

    @staticmethod
    def disabled() -> NullTracker:
        """A tracker that does nothing (tracking off, or not rank 0)."""
        return NullTracker()

    # -- properties
    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def artifact_uri(self) -> str | None:
        return self._artifact_uri

    @property
    def active(self) -> bool:
        return self._active

    @property
    def run_url(self) -> str | None:
        """Link to the run in the MLflow UI when the store is a tracking server, else None."""
        if self._run_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"

    # -- lifecycle
    def start(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str:
        """Create the run, log `params` and `tags`, guard against SIGTERM; returns the run id."""
        if self._run_id is not None:
            raise RuntimeError(f"tracker already started run {self._run_id}; create a new Tracker per run")
        self._experiment_id = _experiment_id(self._client, self.experiment_name, self.artifact_root)
        run_tags_ = {MLFLOW_SOURCE_NAME: sys.argv[0] or "python", **(tags or {})}
        user = _user()
        if user:
            run_tags_.setdefault(MLFLOW_USER, user)
        if self.parent_run_id:
            self._check_parent()
            run_tags_[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        run = self._client.create_run(
            self._experiment_id, run_name=self.run_name,
            tags={k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in run_tags_.items()})
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        self._active = True
        self._install_guards()
        try:
            self.log_params(params or {})
        except BaseException as err:
            self.end(_status_for(type(err), err))  # KILLED for Ctrl-C / SIGTERM, FAILED otherwise
            raise
        log.info("MLflow run %s (%s) in %s", self._run_id, run.info.run_name, self.uri)
        return self._run_id

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with FINISHED, FAILED or KILLED (idempotent)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if not self._active:
            return
        self._active = False
        self._remove_guards()
        self._client.set_terminated(self._run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if not self._active:
            return False
        status = _status_for(exc_type, exc)
        try:
            if status == "FAILED" and exc is not None:
                self.set_tags({"error": f"{exc_type.__name__}: {exc}"})
            self.end(status)
        except Exception:  # never hide the original exception behind a tracking error
            log.exception("could not mark MLflow run %s as %s", self._run_id, status)
        return False

    # -- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values as strings, truncated), in batches within MLflow's per-request limits."""
        entries = [Param(str(k), _truncate(_to_str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), params=list(batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(str(k), _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), tags=list(batch))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at `step`; non-finite values are dropped with a warning (see module doc)."""
        run_id = self._require_run()
        timestamp = int(time.time() * 1000)
        entries, first_bad = [], {}
        for key, value in metrics.items():
            number = _float(key, value)
            if math.isfinite(number):
                entries.append(Metric(key, number, timestamp, int(step)))
                continue
            log.warning("metric %r is %s at step %d: not logged to MLflow", key, number, step)
            if key not in self._nonfinite:
                self._nonfinite.add(key)
                first_bad[f"nonfinite.{key}"] = int(step)
        for batch in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=list(batch))
        if first_bad:
            self.set_tags(first_bad)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's content) under `artifact_path`."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"cannot log artifact {local}: no such file or directory")
        if local.is_dir():
            self._client.log_artifacts(self._require_run(), str(local), artifact_path)
        else:
            self._client.log_artifact(self._require_run(), str(local), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file` (e.g. "config.yaml")."""
        self._client.log_text(self._require_run(), text, artifact_file)

    # -- internals
    def _require_run(self) -> str:
        if not self._active:
            state = "has ended" if self._run_id else "has not started"
            raise RuntimeError(f"the MLflow run {state}: call Tracker.start() first and log before end()")
        return self._run_id

    def _check_parent(self) -> None:
        try:
            parent = self._client.get_run(self.parent_run_id)
        except MlflowException as err:
            raise ValueError(f"parent run {self.parent_run_id} not found in {self.uri}: the sweep callback "
                             "and its jobs must use the same tracking URI") from err
        if parent.info.experiment_id != self._experiment_id:
            log.warning("parent run %s is in another experiment: MLflow only nests runs of one experiment",
                        self.parent_run_id)

    def _install_guards(self) -> None:
        atexit.register(self._end_at_exit)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_run_killed)
            self._sigterm_installed = True

    def _remove_guards(self) -> None:
        atexit.unregister(self._end_at_exit)
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            # None means the old handler was not installed from Python: fall back to the default action.
            old = self._old_sigterm
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
            self._sigterm_installed = False

    def _end_at_exit(self) -> None:
        # Reached only when the run was neither ended nor closed by `with`: the program stopped without us.
        try:
            self.end("FAILED")
        except Exception:
            log.exception("could not end MLflow run %s at exit", self._run_id)


class NullTracker:
    """Same interface as `Tracker`, does nothing: for processes that must not log (rank > 0, tracking off)."""

    enabled = False
    run_id = experiment_id = artifact_uri = run_url = None
    active = False

    def start(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        return None

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        return None

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def create_tracker(tracking_cfg: Mapping[str, Any], project_root: Path, *, is_main: bool = True,
                   parent_run_id: str | None = None, default_run_name: str | None = None) -> Tracker | NullTracker:
    """Tracker from the `tracking` config group; a NullTracker when disabled or not the main process.

    The parent run defaults to the enclosing sweep's (`sweep_parent_run_id()`).
    """
    if not is_main or not tracking_cfg.get("enabled", True):
        return NullTracker()
    return Tracker(resolve_tracking_uri(tracking_cfg.get("uri"), project_root),
                   tracking_cfg.get("experiment_name", "conformer"),
                   run_name=tracking_cfg.get("run_name") or default_run_name,
                   parent_run_id=parent_run_id or sweep_parent_run_id())


def end_unfinished_runs(tracking_cfg: Mapping[str, Any], project_root: Path, run_dir: Path | str,
                        status: str = "FAILED", reason: str | None = None) -> list[str]:
    """End the runs tagged with `run_dir` that are still RUNNING (their process was killed): their ids.

    For the msrun launcher: rank 0 cannot end its run when it is killed, so the parent does it for it.
    """
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    if not tracking_cfg.get("enabled", True):
        return []
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_cfg.get("uri"), project_root))
    experiment = client.get_experiment_by_name(tracking_cfg.get("experiment_name", "conformer"))
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000)
    ended = []
    for run in runs:
        if run.data.tags.get("run_dir") != str(run_dir):
            continue
        if reason:
            client.set_tag(run.info.run_id, "error", _truncate(reason, MAX_TAG_VAL_LENGTH))
        client.set_terminated(run.info.run_id, status)
        ended.append(run.info.run_id)
    return ended


def _raise_run_killed(signum: int, frame: Any) -> None:
    raise RunKilled(f"received signal {signal.Signals(signum).name}")


def _status_for(exc_type: type[BaseException] | None, exc: BaseException | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    if issubclass(exc_type, SystemExit) and getattr(exc, "code", 1) in (0, None):
        return "FINISHED"
    return "FAILED"


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------------- curves
def _metric_group(key: str) -> str:
    """"val/top1_conv" -> "top1", "train/loss" -> "loss", "lr" -> "lr": one subplot per group."""
    name = key.rsplit("/", 1)[-1]
    for suffix in _HEAD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """PNG with one subplot per metric group (loss, lr, top-1 by head, ...), each key a line over steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_curves needs at least one metric history, got an empty mapping")
    groups: dict[str, list[str]] = {}
    for key in history:
        groups.setdefault(_metric_group(key), []).append(key)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), dpi=100)
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _unzip(points: Iterable[tuple[int, float]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for point in points:
        if len(point) != 2:
            raise ValueError(f"history[{key!r}] must hold (step, value) pairs, got {point!r}")
        steps.append(int(point[0]))
        values.append(float(point[1]))
    return steps, values


# ---------------------------------------------------------------------------------------------------- sweeps
def sweep_parent_run_id(sweep_dir: Path | str | None = None) -> str | None:
    """Parent run id of the enclosing Hydra sweep: env CONFORMER_MLFLOW_PARENT_RUN_ID, else the id file that
    `SweepParentCallback` wrote into `sweep_dir`; None outside a sweep."""
    run_id = os.environ.get(SWEEP_PARENT_ENV)
    if run_id:
        return run_id
    if sweep_dir is not None:
        id_file = Path(sweep_dir) / SWEEP_PARENT_FILE
        if id_file.is_file():
            return id_file.read_text().strip() or None
    return None


class SweepParentCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun; every trial's run nests under it.

    on_multirun_start creates the parent (named after the sweep) and publishes its id in the env and the
    sweep dir; on_multirun_end ends it FAILED if any trial failed (Hydra job status or child run status),
    KILLED if a trial was killed, else FINISHED. When a failed trial aborts the sweep before on_multirun_end,
    an exit hook ends the parent instead. `project_root` must be the root the jobs use for the default store
    (default: hydra.runtime.cwd).
    """

    def __init__(self, project_root: str | None = None, run_name: str | None = None) -> None:
        self.project_root = project_root
        self.run_name = run_name
        self._tracker: Tracker | None = None
        self._failed_jobs = 0
        self._previous_env: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._tracker.run_id if self._tracker else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = OmegaConf.select(config, "tracking")
        if tracking is None or not tracking.get("enabled", True):
            return
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir", default="multirun"))
        root = Path(self.project_root or OmegaConf.select(config, "hydra.runtime.cwd", default=None)
                    or os.getcwd())
        job_name = OmegaConf.select(config, "hydra.job.name", default="sweep")
        name = self.run_name or f"{job_name}-{sweep_dir.name}"
        self._tracker = Tracker(resolve_tracking_uri(tracking.get("uri"), root),
                                tracking.get("experiment_name", "conformer"), run_name=name)
        space = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None)
        run_id = self._tracker.start(
            params=flatten_config({"sweep": space}) if space else {},
            tags=run_tags(overrides=list(overrides or []), run_dir=sweep_dir.resolve(), extra={
                "sweep": "parent",
                "sweeper": OmegaConf.select(config, "hydra.sweeper._target_", default=None)}),
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_PARENT_FILE).write_text(run_id + "\n")
        self._previous_env = os.environ.get(SWEEP_PARENT_ENV)
        os.environ[SWEEP_PARENT_ENV] = run_id
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
        if self._previous_env is None:
            os.environ.pop(SWEEP_PARENT_ENV, None)
        else:
            os.environ[SWEEP_PARENT_ENV] = self._previous_env
        status = "FAILED"
        try:
            statuses = _close_children(tracker)
            failed = self._failed_jobs + statuses.count("FAILED")
            if not failed:
                status = "KILLED" if "KILLED" in statuses else "FAILED" if aborted else "FINISHED"
            tracker.set_tags({"sweep.trials": len(statuses), "sweep.failed": failed})
        finally:
            tracker.end(status)


def _close_children(parent: Tracker) -> list[str]:
    """Statuses of the parent's child runs; a child still RUNNING after its job returned is marked FAILED."""
    client = parent._client
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, max_results=50000,
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'")
    statuses = []
    for run in runs:
        status = run.info.status
        if status not in TERMINAL_STATUSES:
            log.warning("child run %s was left %s: marking it FAILED", run.info.run_id, status)
            client.set_terminated(run.info.run_id, "FAILED")
            status = "FAILED"
        statuses.append(status)
    return statuses


__all__ = [
    "NullTracker", "RunKilled", "SweepParentCallback", "Tracker", "create_tracker",
    "default_artifact_root", "default_tracking_uri", "end_unfinished_runs", "flatten_config", "git_commit",
    "plot_curves", "resolve_tracking_uri", "run_tags", "sweep_parent_run_id",
]
