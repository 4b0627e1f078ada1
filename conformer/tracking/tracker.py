"""`Tracker`: one MLflow run, always ended (FINISHED, FAILED, KILLED), that a store going down does not stop;
`NullTracker` for processes that must not log; the params and tags a run records."""
from __future__ import annotations

import atexit
import getpass
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_USER,
)
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from conformer.runtime.signals import on_forced_exit
from conformer.secrets import redact
from conformer.tracking.checkpoints import CHECKPOINT_ARTIFACTS, link_artifact, local_artifact_dir, unlink_artifact
from conformer.tracking.links import describe_model_version, training_link
from conformer.tracking.outbox import (
    Batch,
    Call,
    CheckpointUpload,
    Inputs,
    Outbox,
    Terminate,
    Text,
    Upload,
    store_calls,
    transient,
)
from conformer.tracking.store import (
    HOST_TAG,
    PID_STARTED_TAG,
    PID_TAG,
    TERMINAL_STATUSES,
    TrackingUnavailable,
    close_runs_of_dead_processes,
    default_artifact_root,
    default_tracking_uri,
    experiment_id,
    owner_may_live,
    resolve_tracking_uri,
    search_all_runs,
    terminate,
    unreachable,
)
from conformer.tracking.store import client as store_client
from conformer.tracking.system_metrics import start_system_metrics
from conformer.tracking.values import chunks, metric_float, to_str, truncate

log = logging.getLogger(__name__)
FALLBACK_TAG = "tracking.unavailable_store"  # the store a run fell back from (tracking.fallback_to_local)
SYSTEM_METRICS_INTERVAL_S = 10.0
# on a sweep's trials: their parent's id and name, and the sweep's name (the parent's own tag of that name)
SWEEP_PARENT_TAGS = ("sweep.parent_id", "sweep.parent", "sweep.name")


# ---------------------------------------------------------------------------------------------------- tracker
class Tracker:
    """One MLflow run, on rank 0. Use `with tracker: tracker.start(params, tags); ...`.

    `start` checks an HTTP(S) store first: one that does not answer within 5 s is `TrackingUnavailable`, or, with
    `fallback_uri`, the run goes there. After the start the logging calls return at once: a background thread
    sends them and keeps them while the store is down (conformer.tracking.outbox). `end` waits for them while the
    store answers, and gives a failing store `end_timeout` s before it leaves the run RUNNING there.
    """

    enabled = True

    def __init__(self, uri: str, experiment_name: str, run_name: str | None = None,
                 artifact_root: str | Path | None = None, parent_run_id: str | None = None, *,
                 fallback_uri: str | None = None, end_timeout: float = 30.0, retry_interval: float = 5.0,
                 max_buffered: int = 20_000, system_metrics: float | None = None,
                 log_checkpoints: bool = True) -> None:
        if not experiment_name:
            raise ValueError("tracking.experiment_name must be a non-empty string")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self._artifact_root = artifact_root
        self.parent_run_id = parent_run_id
        self.fallback_uri = fallback_uri
        self.end_timeout, self.retry_interval, self.max_buffered = end_timeout, retry_interval, max_buffered
        self._use_store(uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.artifact_uri: str | None = None
        self.active = False  # between start() and end()
        self._nonfinite: set[str] = set()
        self._outbox: Outbox | None = None
        self.log_checkpoints = bool(log_checkpoints)  # log_checkpoint stores checkpoints in the run
        self.system_metrics = system_metrics  # sampling interval (s) of MLflow's system metrics; None: off
        self._monitor: Any = None

    # -- lifecycle
    def start(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              resume_run_id: str | None = None) -> str:
        """Create the run (or continue `resume_run_id`, a run of this experiment: RUNNING again, its params kept),
        log `params` and `tags`, end it at exit if the program forgets; returns the run id."""
        if self.run_id is not None:
            raise RuntimeError(f"tracker already started run {self.run_id}; create a new Tracker per run")
        run_tags_ = {MLFLOW_SOURCE_NAME: sys.argv[0] or "python", HOST_TAG: socket.gethostname(),
                     PID_TAG: os.getpid(), PID_STARTED_TAG: f"{psutil.Process().create_time():.3f}",
                     **self._check_store(), **(tags or {})}
        user = _user()
        if user:
            run_tags_.setdefault(MLFLOW_USER, user)
        with store_calls(self.uri):
            self.experiment_id = experiment_id(self._client, self.experiment_name, self.artifact_root)
            close_runs_of_dead_processes(self._client)
            if self.parent_run_id:
                run_tags_.update(self._check_parent())
                run_tags_[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
            tags_ = {k: truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in run_tags_.items()}
            run = self._continue(resume_run_id, tags_) if resume_run_id else None
            if run is None:
                run = self._client.create_run(self.experiment_id, run_name=self.run_name, tags=tags_)
            else:
                params = {k: v for k, v in (params or {}).items() if k not in run.data.params}
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        self._outbox = Outbox(self._client, self.run_id, self.uri, retry_interval=self.retry_interval,
                              end_timeout=self.end_timeout, max_buffered=self.max_buffered)
        self.active = True
        atexit.register(self._end_at_exit)
        self._forget_forced_exit = on_forced_exit(lambda: self.end("KILLED"))
        try:
            self.log_params(params or {})
        except BaseException as err:
            self.end(_status_for(type(err), err))  # KILLED for Ctrl-C / SIGTERM, FAILED otherwise
            raise
        if self.system_metrics:
            self._monitor = start_system_metrics(self, self.system_metrics, resumed=resume_run_id == self.run_id)
        log.info("MLflow run %s (%s) in %s%s", self.run_id, run.info.run_name, redact(self.uri), self._ui_link())
        return self.run_id

    def _ui_link(self) -> str:
        """For a server store: the run's experiment in the UI, on its runs table (MLflow 3 opens its GenAI view
        unless told `workflowType=machine_learning`)."""
        if not self.uri.startswith(("http://", "https://")):
            return ""
        base = redact(self.uri).rstrip("/")
        return f" | {base}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    def _continue(self, run_id: str, tags: Mapping[str, str]) -> Any:
        """The run `run_id`, RUNNING again with this process's tags; None when it cannot be continued here."""
        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s is not in %s: the resumed training starts a new run", run_id, self.uri)
            return None
        if run.info.experiment_id != self.experiment_id:
            log.warning("MLflow run %s is in another experiment: the resumed training starts a new run", run_id)
            return None
        self._client.update_run(run_id, status="RUNNING")
        if "error" in run.data.tags:  # set when the killed process's run was closed as FAILED
            self._client.delete_tag(run_id, "error")
        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {**tags, "resumed": "true"}.items()])
        log.info("continuing MLflow run %s (it was %s)", run_id, run.info.status)
        return self._client.get_run(run_id)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with FINISHED, FAILED or KILLED (idempotent), after the calls still queued. A store
        that fails for `end_timeout` s leaves the run RUNNING there (one warning): the run ends here regardless."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if not self.active:
            return
        if self._monitor is not None:
            self._monitor.finish()  # before the run ends: a sample in flight still has its run
            self._monitor = None
        self.active = False
        atexit.unregister(self._end_at_exit)
        self._forget_forced_exit()
        self._outbox.put(Terminate(status, get_current_time_millis()))
        unsent = self._outbox.close()
        if unsent:
            log.warning("MLflow store %s failed for %g s while run %s ended: the run stays RUNNING there, %d logging "
                        "calls unsent (the next run started on %s marks it FAILED)", self.uri, self.end_timeout,
                        self.run_id, unsent - 1, socket.gethostname())

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if not self.active:
            return False
        status = _status_for(exc_type, exc)
        try:
            if status == "FAILED" and exc is not None:
                self.set_tags({"error": f"{exc_type.__name__}: {exc}"})
            self.end(status)
        except Exception:  # never hide the original exception behind a tracking error
            log.exception("could not mark MLflow run %s as %s", self.run_id, status)
        return False

    # -- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values as strings, truncated), in batches within MLflow's per-request limits."""
        entries = [Param(str(k), truncate(to_str(v), MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for batch in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._send(Batch(params=list(batch)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(str(k), truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for batch in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._send(Batch(tags=list(batch)))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at `step`; non-finite values are dropped with a warning (see module doc)."""
        self._require_run()
        timestamp = int(time.time() * 1000)
        entries, first_bad = [], {}
        for key, value in metrics.items():
            number = metric_float(key, value)
            if math.isfinite(number):
                entries.append(Metric(key, number, timestamp, int(step)))
                continue
            log.warning("metric %r is %s at step %d: not logged to MLflow", key, number, step)
            if key not in self._nonfinite:
                self._nonfinite.add(key)
                first_bad[f"nonfinite.{key}"] = int(step)
        for batch in chunks(entries, MAX_METRICS_PER_BATCH):
            self._send(Batch(metrics=list(batch)))
        if first_bad:
            self.set_tags(first_bad)

    def last_step(self, key: str) -> int | None:
        """The last step of metric `key` in this run (in a continued run: what the killed process logged); None when
        it has none or the store does not answer (tracking never stops a training)."""
        if self.run_id is None:
            return None
        try:
            history = self._client.get_metric_history(self.run_id, key)
        except Exception as err:  # noqa: BLE001  (any store failure: the caller logs as if there were none)
            log.warning("MLflow run %s: could not read the history of %s (%s)", self.run_id, key, err)
            return None
        return max((metric.step for metric in history), default=None)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's content) under `artifact_path`, as it is when the upload happens."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"cannot log artifact {local}: no such file or directory")
        self._send(Upload(local, artifact_path))

    def log_checkpoint(self, path: Path | str) -> None:
        """Store the checkpoint file `path` as the artifact `checkpoints/<name>` (see conformer.tracking.checkpoints):
        linked at once into a local artifact store, else uploaded in the background. Off with `log_checkpoints`
        false; never raises (a checkpoint that cannot be stored warns: the training goes on)."""
        if not (self.active and self.log_checkpoints):
            return
        path = Path(path)
        local = local_artifact_dir(self.artifact_uri)
        if local is None:
            self._send(CheckpointUpload(path, CHECKPOINT_ARTIFACTS))
            return
        try:
            link_artifact(path, local / CHECKPOINT_ARTIFACTS)
        except OSError as err:
            log.warning("MLflow run %s: could not store %s as an artifact (%s)", self.run_id, path, err)

    def forget_checkpoint(self, name: str) -> None:
        """Drop the artifact `checkpoints/<name>` of a local artifact store (a top-k file pushed out of the run dir);
        a remote store keeps what it received."""
        local = local_artifact_dir(self.artifact_uri) if self.active and self.log_checkpoints else None
        if local is not None:
            unlink_artifact(name, local / CHECKPOINT_ARTIFACTS)

    def link_training(self, run_id: str) -> None:
        """This run's description (shown on its page): the training run that wrote its weights, as a link."""
        self.set_tags({MLFLOW_RUN_NOTE: f"Weights of the {training_link(self._client, run_id)}."})

    def describe_model_version(self, name: str, version: str, *, source_run_id: str | None, served_by: str,
                               details: Mapping[str, Any]) -> None:
        """Description and tags of a registered model version (conformer.tracking.links)."""
        describe_model_version(self._client, name, version, source_run_id=source_run_id, served_by=served_by,
                               details=details)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file` (e.g. "config.yaml")."""
        self._send(Text(redact(text), artifact_file))

    def log_inputs(self, datasets: Sequence[Any], context: str) -> None:
        """Record `mlflow.entities.Dataset`s as the run's inputs, tagged with `context` ("train", "validation")."""
        self._send(Inputs(tuple(datasets), context))

    def close_children(self) -> list[str]:
        """Statuses of this run's child runs; a child still RUNNING whose process is gone is marked FAILED (one whose
        process lives, another sweep worker's trial on a shared parent, is left RUNNING)."""
        statuses = []
        for run in search_all_runs(self._client, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self._require_run()}'"):
            status = run.info.status
            if status not in TERMINAL_STATUSES and not owner_may_live(run):
                terminate(self._client, run.info.run_id, "FAILED", f"left {status} after its job ended")
                status = "FAILED"
            statuses.append(status)
        return statuses

    # -- internals
    def _use_store(self, uri: str) -> None:
        self.uri = uri
        self.artifact_root = self._artifact_root if self._artifact_root is not None else default_artifact_root(uri)
        self._client = store_client(uri)

    def _check_store(self) -> dict[str, str]:
        """Fail fast on an HTTP(S) store that does not answer, or switch to `fallback_uri`: the tags saying so."""
        reason = unreachable(self.uri)
        if reason is None:
            return {}
        if self.fallback_uri is None:
            raise TrackingUnavailable(self.uri, reason)
        log.warning("MLflow store %s is unreachable (%s): this run goes to %s instead (tracking.fallback_to_local)",
                    redact(self.uri), redact(reason), self.fallback_uri)
        unavailable = redact(self.uri)
        self._use_store(self.fallback_uri)
        return {FALLBACK_TAG: unavailable}

    def _send(self, call: Call) -> None:
        self._require_run()
        self._outbox.put(call)

    def _require_run(self) -> str:
        if not self.active:
            state = "has ended" if self.run_id else "has not started"
            raise RuntimeError(f"the MLflow run {state}: call Tracker.start() first and log before end()")
        return self.run_id

    def _check_parent(self) -> dict[str, str]:
        """The parent run exists; the tags naming it on a child (`SWEEP_PARENT_TAGS`: its id, name and sweep name),
        which the UI groups and filters a sweep's trials by."""
        try:
            parent = self._client.get_run(self.parent_run_id)
        except MlflowException as err:
            if transient(err):
                raise
            raise ValueError(f"parent run {self.parent_run_id} not found in {self.uri}: the sweep callback "
                             "and its jobs must use the same tracking URI") from err
        if parent.info.experiment_id != self.experiment_id:
            log.warning("parent run %s is in another experiment: MLflow only nests runs of one experiment",
                        self.parent_run_id)
        id_tag, name_tag, sweep_tag = SWEEP_PARENT_TAGS
        tags = {id_tag: self.parent_run_id, name_tag: parent.info.run_name, sweep_tag: parent.data.tags.get(sweep_tag)}
        return {key: value for key, value in tags.items() if value}

    def _end_at_exit(self) -> None:
        # Reached only when the run was neither ended nor closed by `with`: the program stopped without us.
        try:
            self.end("FAILED")
        except Exception:
            log.exception("could not end MLflow run %s at exit", self.run_id)


class NullTracker:
    """Same interface as `Tracker`, does nothing: for processes that must not log (rank > 0, tracking off)."""

    enabled = active = False
    run_id = experiment_id = artifact_uri = None

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    start = end = log_params = set_tags = log_metrics = log_artifact = log_text = log_inputs = last_step = _ignore
    log_checkpoint = forget_checkpoint = link_training = describe_model_version = _ignore

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def create_tracker(tracking_cfg: Mapping[str, Any], project_root: Path, *, is_main: bool = True,
                   default_run_name: str | None = None) -> Tracker | NullTracker:
    """Tracker from the `tracking` config group (its run nested under `tracking.parent_run_id` when set, falling
    back to the project's SQLite store when `tracking.fallback_to_local` and the store does not answer); a
    NullTracker when tracking is disabled or this is not the main process."""
    if not is_main or not tracking_cfg.get("enabled", True):
        return NullTracker()
    fallback = default_tracking_uri(project_root) if tracking_cfg.get("fallback_to_local", False) else None
    return Tracker(resolve_tracking_uri(tracking_cfg.get("uri"), project_root),
                   tracking_cfg.get("experiment_name", "conformer"),
                   run_name=tracking_cfg.get("run_name") or default_run_name,
                   parent_run_id=tracking_cfg.get("parent_run_id"), fallback_uri=fallback,
                   system_metrics=_interval(tracking_cfg.get("system_metrics", False)),
                   log_checkpoints=bool(tracking_cfg.get("log_checkpoints", True)))


def _interval(system_metrics: Any) -> float | None:
    """`tracking.system_metrics`: false (off), true (every 10 s) or a sampling interval in seconds."""
    if system_metrics is True:
        return SYSTEM_METRICS_INTERVAL_S
    return float(system_metrics) if system_metrics else None


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
