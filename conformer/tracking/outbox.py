"""A run's logging calls on their way to the store: queued by the caller, sent in order by one background thread,
kept and retried while the store is down, so that the training never waits on MLflow nor sees its errors.

The thread sends each call with MLflow's HTTP retries off (`short_requests`) and does its own retrying: while the
store fails it warns once, keeps the calls (metrics up to `max_buffered` queued calls, the rest always) and tries
again every `retry_interval` s; when a call goes through it logs one line that the store is back and sends the
backlog in order (consecutive metric calls merged into batches of up to 1000 values).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from conformer.tracking.store import REQUEST_TIMEOUT_S, TrackingUnavailable, short_requests

log = logging.getLogger(__name__)
LOCAL_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

END_RETRY_INTERVAL_S = 1.0  # while the run ends, within its retry budget


@contextmanager
def store_calls(uri: str) -> Iterator[None]:
    """The tracker's own synchronous calls (creating its run): short requests, and a store that fails them for a
    reason worth retrying is `TrackingUnavailable`."""
    try:
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            yield
    except MlflowException as err:
        if not transient(err):
            raise
        raise TrackingUnavailable(uri, one_line(err)) from err


def transient(err: BaseException) -> bool:
    """A failure worth retrying: no connection, a timeout, a 5xx or 429 answer (requests' errors are OSErrors); not
    a call the store rejects nor a local file that cannot be read."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(err, OSError) and not isinstance(err, LOCAL_FILE_ERRORS)


def one_line(err: BaseException, limit: int = 200) -> str:
    """`err` on one short line: MLflow's connection errors put the cause at the end of a very long message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else f"{text[:limit // 2 - 3]} ... {text[-(limit // 2 - 2):]}"


# ---------------------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class Batch:
    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)
    timeout = REQUEST_TIMEOUT_S

    def send(self, client: MlflowClient, run_id: str) -> None:
        client.log_batch(run_id, metrics=self.metrics, params=self.params, tags=self.tags)


@dataclass(frozen=True)
class Upload:
    """A file or a directory's content, read when it is sent."""

    path: Path
    artifact_path: str | None = None
    timeout = None

    def send(self, client: MlflowClient, run_id: str) -> None:
        if self.path.is_dir():
            client.log_artifacts(run_id, str(self.path), self.artifact_path)
        else:
            client.log_artifact(run_id, str(self.path), self.artifact_path)


@dataclass(frozen=True)
class CheckpointUpload:
    """A checkpoint file as `<artifact_path>/<its name>`, read when it is sent: the newest save of that name goes up
    (a later save replaces the file by a rename, so a read sees one whole file); a file gone meanwhile (a top-k
    checkpoint pushed out) is skipped. Queued while the same upload still waits, it is not queued twice."""

    path: Path
    artifact_path: str = "checkpoints"
    timeout = None

    def send(self, client: MlflowClient, run_id: str) -> None:
        # A hard link in a private dir next to it pins this save's bytes while they go up (a save renamed over the
        # name meanwhile is another file); where links fail, the file is read by its name.
        if not self.path.parent.is_dir():
            return
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=self.path.parent) as pinned:
            source = Path(pinned) / self.path.name
            try:
                os.link(self.path, source)
            except FileNotFoundError:
                return
            except OSError:
                source = self.path
            client.log_artifact(run_id, str(source), self.artifact_path)


@dataclass(frozen=True)
class Text:
    text: str
    artifact_file: str
    timeout = None

    def send(self, client: MlflowClient, run_id: str) -> None:
        client.log_text(run_id, self.text, self.artifact_file)


@dataclass(frozen=True)
class Terminate:
    status: str
    end_time: int  # ms: when the run ended here, not when the store learnt it
    timeout = REQUEST_TIMEOUT_S

    def send(self, client: MlflowClient, run_id: str) -> None:
        client.set_terminated(run_id, self.status, end_time=self.end_time)


@dataclass(frozen=True)
class Inputs:
    """Datasets (`mlflow.entities.Dataset`) the run used, in one context ("train", "validation")."""

    datasets: tuple
    context: str
    timeout = REQUEST_TIMEOUT_S

    def send(self, client: MlflowClient, run_id: str) -> None:
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, self.context)]
        client.log_inputs(run_id, [DatasetInput(dataset, tags) for dataset in self.datasets])


Call = Batch | Upload | CheckpointUpload | Text | Inputs | Terminate


def _metrics_only(call: Call) -> bool:
    return isinstance(call, Batch) and not call.params and not call.tags


def _merged(calls: Sequence[Call]) -> Call:
    return calls[0] if len(calls) == 1 else Batch(metrics=[m for call in calls for m in call.metrics])


# ---------------------------------------------------------------------------------------------------- outbox
class Outbox:
    """The queue of one run's calls and the daemon thread that sends them (see the module doc)."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str, *, retry_interval: float = 5.0,
                 end_timeout: float = 30.0, max_buffered: int = 20_000) -> None:
        self._client, self._run_id, self._uri = client, run_id, uri
        self.retry_interval, self.end_timeout, self.max_buffered = retry_interval, end_timeout, max_buffered
        self._queue: deque[Call] = deque()
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._closing_since: float | None = None
        self._failing_since: float | None = None  # first failure since the last call that went through
        self._dropped = self._rejected = 0
        self._unmerged = 0  # calls to send one by one: a rejected merged batch is retried call by call
        self._thread = threading.Thread(target=self._run, name=f"mlflow-outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, call: Call) -> None:
        """Queue `call`; returns at once. Metric calls beyond `max_buffered` waiting calls are dropped."""
        with self._cond:
            if isinstance(call, CheckpointUpload) and call in self._queue:  # the queued one will read the newest
                return
            if _metrics_only(call) and len(self._queue) >= self.max_buffered:
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("MLflow store %s: %d logging calls waiting, new metrics are dropped until it takes "
                                "them", self._uri, len(self._queue))
                return
            self._queue.append(call)
            self._cond.notify()

    def close(self) -> int:
        """Send what is queued, giving up once the store has failed for `end_timeout` s (counted from the close or
        its last answer, whichever is later: a store that answers gets the time it needs); the calls left unsent."""
        with self._cond:
            self._closing_since = time.monotonic()
            self._cond.notify()
        self._closed.set()
        self._thread.join()
        return len(self._queue)

    # -- the thread
    def _run(self) -> None:
        while (calls := self._next()) is not None:
            error = self._attempt(_merged(calls))
            with self._cond:
                retry = self._settle(calls, error)
            if retry:
                self._pause()

    def _settle(self, calls: list[Call], error: Exception | None) -> bool:
        """Book the outcome of sending `calls`; True when the store failed and they wait for the next try."""
        if error is None:
            self._went_through()
            return False
        if transient(error):
            self._queue.extendleft(reversed(calls))
            self._failed(error)
            return True
        if len(calls) > 1:  # one bad call must not take its batch-mates down with it: send them one by one
            self._queue.extendleft(reversed(calls))
            self._unmerged = len(calls)
            return False
        self._rejected += 1
        if self._rejected == 1:
            log.warning("MLflow store %s rejected a logging call, dropped (%s); later rejections are dropped "
                        "silently", self._uri, one_line(error))
        return False

    def _next(self) -> list[Call] | None:
        """The next calls to send (consecutive metric calls merged), None when there is nothing more to do."""
        with self._cond:
            while not self._queue and self._closing_since is None:
                self._cond.wait()
            if not self._queue or self._budget_left() <= 0:
                return None
            calls = [self._queue.popleft()]
            if self._unmerged:
                self._unmerged -= 1
            elif _metrics_only(calls[0]):
                count = len(calls[0].metrics)
                while (self._queue and _metrics_only(self._queue[0])
                       and count + len(self._queue[0].metrics) <= MAX_METRICS_PER_BATCH):
                    count += len(self._queue[0].metrics)
                    calls.append(self._queue.popleft())
            return calls

    def _attempt(self, call: Call) -> Exception | None:
        try:
            with short_requests(self._timeout(call)):
                call.send(self._client, self._run_id)
        except Exception as err:  # every failure is the caller's to sort: none may reach the training
            return err
        return None

    def _went_through(self) -> None:
        if self._failing_since is None:
            return
        dropped = f"; {self._dropped} metric calls were dropped (buffer full)" if self._dropped else ""
        log.info("MLflow store %s is back after %.0f s: sending the %d logging calls kept meanwhile%s", self._uri,
                 time.monotonic() - self._failing_since, len(self._queue), dropped)
        self._failing_since, self._dropped = None, 0

    def _failed(self, error: Exception) -> None:
        if self._failing_since is not None:
            return
        self._failing_since = time.monotonic()
        log.warning("MLflow store %s unreachable (%s): training goes on, %d logging calls kept and retried every "
                    "%g s", self._uri, one_line(error), len(self._queue), self.retry_interval)

    def _pause(self) -> None:
        if self._closing_since is None:
            self._closed.wait(self.retry_interval)  # close() cuts the wait short
        else:
            time.sleep(max(0.0, min(END_RETRY_INTERVAL_S, self._budget_left())))

    def _budget_left(self) -> float:
        """Seconds the closing run may still give a failing store: infinite before the close, the whole budget
        while the store answers (it gets the time it needs, each request up to the budget)."""
        if self._closing_since is None:
            return math.inf
        if self._failing_since is None:
            return self.end_timeout
        return self.end_timeout - (time.monotonic() - max(self._closing_since, self._failing_since))

    def _timeout(self, call: Call) -> int | None:
        """The call's request timeout; while closing, no longer than the budget left (at least 1 s)."""
        left = self._budget_left()
        if math.isinf(left):
            return call.timeout
        cap = max(1, math.ceil(left))
        return cap if call.timeout is None else min(call.timeout, cap)
