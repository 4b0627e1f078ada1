"""The MLflow store: where it is, its experiments, and the runs no process ends any more (killed, gone)."""
from __future__ import annotations

import base64
import http.client
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psutil
from mlflow import MlflowClient
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from conformer.errors import TrackingUnavailable  # noqa: F401  (raised here, caught by run.py)
from conformer.secrets import has_secret, redact
from conformer.vocabulary import MLFLOW_PREFIX

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10  # per HTTP request of a batch or a status change; uploads keep MLflow's (120 s by default)

# MLflow reads its MLFLOW_HTTP_REQUEST_* variables at every request (mlflow/utils/rest_utils.py::http_request), through
# each variable's `get_raw`. Our overrides live in a thread-local read there, never in the process environment: a
# tracking thread that wrote os.environ would call setenv, which may move the C environment while MindSpore reads
# it with getenv on another thread (an msrun worker died of that SIGSEGV in getenv), and threads would see each
# other's overrides.
_HTTP_VARIABLES = (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                   MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, MLFLOW_HTTP_REQUEST_TIMEOUT)
_overrides = threading.local()


def _read_with_overrides(variable: Any) -> Callable[[], str | None]:
    """`variable.get_raw` that returns this thread's override of it, if any."""
    read_environment = type(variable).get_raw

    def get_raw() -> str | None:
        values = getattr(_overrides, "values", None) or {}
        return values[variable.name] if variable.name in values else read_environment(variable)
    return get_raw


for _variable in _HTTP_VARIABLES:
    _variable.get_raw = _read_with_overrides(_variable)


class _UrlPrinting:
    """MLflow prints `View run <name> at: <store URL>` when a run on a server ends, user info (a password)
    included: once this process uses a store with user info, that line is off (MLflow's own switch, answered here,
    never written to the environment); the run's start log gives the redacted link."""

    secret = False
    read_environment = MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get

    @classmethod
    def get(cls) -> bool:
        return True if cls.secret else cls.read_environment()


MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get = _UrlPrinting.get


def client(uri: str) -> MlflowClient:
    """An MlflowClient for `uri`; a URI with user info turns off MLflow's printing of the store's URL."""
    if has_secret(uri):
        _UrlPrinting.secret = True
    return MlflowClient(tracking_uri=uri)


@contextmanager
def short_requests(timeout: int | None, retries: int = 0) -> Iterator[None]:
    """MLflow HTTP calls inside, on this thread, get `retries` quick retries (MLflow's default, 7 with exponential
    backoff, keeps a call to a dead server going for ~12 minutes) and `timeout` s per request (None: MLflow's
    setting)."""
    values = {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: str(retries), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: "1",
              MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.name: "0"}
    if timeout is not None:
        values[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(timeout)
    outer = getattr(_overrides, "values", None)
    _overrides.values = {**(outer or {}), **values}
    try:
        yield
    finally:
        _overrides.values = outer


TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# What the MLflow 3 UI reads to file an experiment's runs (set by its "experiment type" selector): a model-training
# experiment opens on its runs table, not under "Evaluation runs" of the GenAI view.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
HOST_TAG, PID_TAG = "host", "pid"  # where a run's process lives: stale RUNNING runs are found by them
PID_STARTED_TAG = "pid_started"  # when that process started (epoch s): a pid reused by another process is not it
PROBE_TIMEOUT_S = 5.0


def _authorization(parsed: Any) -> str | None:
    """The Authorization header MLflow sends to this store: the URI's user info (as `requests` reads it), else
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, else MLFLOW_TRACKING_TOKEN."""
    user, password = parsed.username, parsed.password
    if user is None:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    else:
        user, password = unquote(user), unquote(password or "")
    if user is not None and password is not None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return f"Bearer {token}" if token else None


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the HTTP(S) store `uri` does not answer `GET <uri>/health` within `timeout` s; None when it answers
    (any status below 500: a server that answers is up) or when `uri` is not HTTP(S). Credentials go as MLflow
    sends them (`_authorization`), never in the URL, and the reason names the store without them."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    host = parsed.netloc.rpartition("@")[2]
    url = f"{parsed._replace(netloc=host).geturl().rstrip('/')}/health"
    request = urllib.request.Request(url)
    authorization = _authorization(parsed)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as err:
        return None if err.code < 500 else f"GET {url}: HTTP {err.code}"
    except urllib.error.URLError as err:
        return f"GET {url}: {err.reason}"
    except (OSError, http.client.HTTPException) as err:  # timeouts, resets, garbage instead of HTTP
        return f"GET {url}: {err or type(err).__name__}"


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


def experiment_id(client: MlflowClient, name: str, artifact_root: str | Path | None) -> str:
    """Id of the active experiment `name`, created (artifacts under `artifact_root`) if it does not exist, and
    marked as a model-training experiment (`EXPERIMENT_KIND_TAG`) unless it says what it is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = _experiment_location(artifact_root, name) if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
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
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def client_for(tracking_cfg: Mapping[str, Any], project_root: Path) -> MlflowClient:
    return client(resolve_tracking_uri(tracking_cfg.get("uri"), project_root))


def end_unfinished_runs(tracking_cfg: Mapping[str, Any], project_root: Path, run_dir: Path | str,
                        status: str = "FAILED", reason: str | None = None) -> list[str]:
    """End the runs tagged with `run_dir` that are still RUNNING (their process was killed): their ids.

    For the msrun launcher: rank 0 cannot end its run when it is killed, so the parent does it for it.
    """
    if not tracking_cfg.get("enabled", True):
        return []
    client = client_for(tracking_cfg, project_root)
    runs = [run for run in search_all_runs(client, "attributes.status = 'RUNNING'")
            if run.data.tags.get("run_dir") == str(run_dir)]
    for run in runs:
        terminate(client, run.info.run_id, status, reason)
    return [run.info.run_id for run in runs]


def close_runs_of_dead_processes(client: MlflowClient) -> list[str]:
    """End FAILED the RUNNING runs of this host whose process is gone (SIGKILL, OOM killer, power loss): their ids.

    Called whenever a run starts. Whether a run's owner lives is asked of the owner itself: the lock a training
    holds on its run dir (conformer.runtime.runlock), else the process of the run's `pid` tag, which must be the one
    that started (or continued) the run (tag `pid_started`: its start time; a pid now used by another process counts as
    gone). A run of another host is left alone (its process cannot be seen from here). Store errors only warn: they
    must not stop a start.
    """
    host = socket.gethostname()
    try:
        runs = search_all_runs(client, f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
        dead = [run for run in runs if not _owner_alive(run)]
        for run in dead:
            terminate(client, run.info.run_id, "FAILED", f"process {run.data.tags.get(PID_TAG)} on {host} ended "
                                                          "without ending this run (killed?)")
    except MlflowException as err:
        log.warning("could not look for runs left RUNNING by dead processes: %s", err)
        return []
    return [run.info.run_id for run in dead]


def owner_may_live(run: Any) -> bool:
    """A RUNNING run whose process may still be at work: alive on this host, or on another (not visible from here)."""
    host = run.data.tags.get(HOST_TAG)
    return (host is not None and host != socket.gethostname()) or _owner_alive(run)


def _owner_alive(run: Any) -> bool:
    from conformer.runtime.runlock import owner

    tags = run.data.tags
    held = owner(tags["run_dir"]) if tags.get("run_dir") else None
    if held is not None:  # the run dir's lock says it: held (a pid or 0) or not (False)
        return held is not False
    try:
        pid = int(tags.get(PID_TAG, -1))
        started = float(tags[PID_STARTED_TAG]) if PID_STARTED_TAG in tags else None
    except ValueError:
        return False
    if started is not None:
        return _alive(pid, lambda created: abs(created - started) <= 1.0)
    # runs of older versions: the process must not be younger than the run
    return _alive(pid, lambda created: created <= run.info.start_time / 1000.0 + 1.0)


def _alive(pid: int, same_process: Callable[[float], bool]) -> bool:
    """Process `pid` runs, and its start time (epoch seconds) passes `same_process`."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and same_process(process.create_time())
    except (psutil.Error, ValueError):
        return False


def search_all_runs(client: MlflowClient, filter_string: str) -> list[Any]:
    """Runs of every experiment of the store that match `filter_string` (a dead server fails in seconds)."""
    with short_requests(REQUEST_TIMEOUT_S, retries=2):
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        return list(client.search_runs(experiment_ids, filter_string=filter_string, max_results=50000))


def terminate(client: MlflowClient, run_id: str, status: str, reason: str | None) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
    with short_requests(REQUEST_TIMEOUT_S, retries=2):
        log.warning("MLflow run %s: marked %s (%s)", run_id, status, reason or "no reason given")
        if reason:
            client.set_tag(run_id, "error", redact(reason)[:MAX_TAG_VAL_LENGTH])
        client.set_terminated(run_id, status)


def local_weights(spec: str, tracking: Mapping[str, Any], project_root: Path, checkpoint: str = "best.ckpt") -> Path:
    """The local file of a weights spec; `checkpoint` picks the file of an `mlflow:` run."""
    spec = str(spec)
    if spec.startswith(MLFLOW_PREFIX):
        return run_checkpoint(tracking, project_root, spec[len(MLFLOW_PREFIX):], checkpoint)
    return Path(spec).expanduser().resolve()


def run_checkpoint(tracking_cfg: Mapping[str, Any], project_root: Path, run_id: str, name: str = "best.ckpt") -> Path:
    """The checkpoint `name` of training run `run_id`: in its run dir (tag `run_dir`), else among its artifacts (a
    local artifact store's file itself; a remote store's downloaded into `<project root>/.cache/mlflow/<run_id>/`).
    LookupError (saying what is missing) otherwise."""
    from conformer.tracking.checkpoints import CHECKPOINT_ARTIFACTS, local_artifact_dir

    client = client_for(tracking_cfg, project_root)
    try:
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            run = client.get_run(run_id)
    except MlflowException as err:
        raise LookupError(f"no MLflow run {run_id} in {client.tracking_uri}") from err
    local = Path(run.data.tags.get("run_dir", "")) / "checkpoints" / name
    if run.data.tags.get("run_dir") and local.is_file():
        return local
    artifacts = local_artifact_dir(run.info.artifact_uri)
    if artifacts is not None and (artifacts / CHECKPOINT_ARTIFACTS / name).is_file():
        return artifacts / CHECKPOINT_ARTIFACTS / name
    target = Path(project_root) / ".cache" / "mlflow" / run_id
    try:
        return Path(client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{name}", str(target)))
    except (MlflowException, OSError) as err:
        raise LookupError(f"MLflow run {run_id} has no checkpoints/{name}: not in its run dir {local.parent} (moved "
                          "or deleted?) nor among its artifacts (stored there unless tracking.log_checkpoints=false); "
                          "give the checkpoint's path instead") from err
