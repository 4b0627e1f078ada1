"""A tracking store that is down when the run starts, dies mid-run, or is gone when the run ends: real
`mlflow server` processes on 127.0.0.1, started and SIGKILLed by the tests."""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from mlflow import MlflowClient

from conformer.runtime.launch import free_port
from conformer.tracking import Tracker, TrackingUnavailable, create_tracker, default_tracking_uri

from .helpers import MlflowServer

OUTAGE_LOGGER = "conformer.tracking"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One server for the module (it takes ~6 s to start); each test starts it if a previous one left it dead."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(autouse=True)
def _no_inherited_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _records(caplog, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


def _one_line_warning(caplog, text: str) -> logging.LogRecord:
    """The only record containing `text`: a warning of one line, without a traceback."""
    records = _records(caplog, text)
    assert len(records) == 1, [record.getMessage() for record in records]
    record = records[0]
    assert record.levelno == logging.WARNING and record.exc_info is None and "\n" not in record.getMessage()
    return record


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"no {what} after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def test_a_store_that_does_not_answer_fails_the_start_in_one_line_or_falls_back(tmp_path, caplog):
    refused = f"http://127.0.0.1:{free_port()}"  # nobody listens: connection refused
    silent = socket.socket()  # listens, never answers: the probe times out
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    mute = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        for uri, reason in ((refused, "refused"), (mute, "timed out")):
            tracker = Tracker(uri, "outage")
            with pytest.raises(TrackingUnavailable) as error:  # "timed out": the probe has a timeout of its own
                tracker.start({"lr": 0.1}, {})
            message = str(error.value)
            assert "\n" not in message and reason in message
            assert message.startswith(f"MLflow tracking store {uri} is unreachable") and "tracking=disabled" in message
            assert tracker.run_id is None and not tracker.active
    finally:
        silent.close()

    caplog.set_level(logging.INFO, logger=OUTAGE_LOGGER)
    config = {"uri": refused, "experiment_name": "outage", "fallback_to_local": True}
    with create_tracker(config, tmp_path) as tracker:
        run_id = tracker.start({"lr": 0.1}, {"model": "tiny"})
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_text("local", "note.txt")
    local = default_tracking_uri(tmp_path)
    assert tracker.uri == local and tracker.artifact_root == tmp_path.resolve() / "mlruns"
    assert f"goes to {local} instead" in _one_line_warning(caplog, "is unreachable").getMessage()
    client = MlflowClient(local)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["model"] == "tiny" and run.data.tags["tracking.unavailable_store"] == refused
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    assert (tmp_path / "mlruns").is_dir() and [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
    with pytest.raises(TrackingUnavailable):  # the fallback is opt-in
        create_tracker({**config, "fallback_to_local": False}, tmp_path).start({}, {})


def test_a_store_that_dies_mid_run_gets_every_buffered_call_when_it_returns(server, caplog):
    caplog.set_level(logging.INFO, logger=OUTAGE_LOGGER)
    server.start()
    client = MlflowClient(server.url)
    latencies = []

    def log_steps(tracker: Tracker, steps: range) -> None:
        for step in steps:
            latencies.append(_timed(lambda s=step: tracker.log_metrics({"loss": 1.0 / (s + 1), "lr": s / 100}, s)))

    def steps_on_server(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "loss"))

    with Tracker(server.url, "outage", retry_interval=0.5) as tracker:
        run_id = tracker.start({"epochs": 300}, {"phase": "before"})
        log_steps(tracker, range(0, 20))
        _eventually(lambda: len(steps_on_server(run_id)) == 20, "steps 0-19 on the server")

        server.kill()
        log_steps(tracker, range(20, 40))
        tracker.log_metrics({"bad?name": 1.0}, step=40)  # rejected by the store: must not take the batch down
        log_steps(tracker, range(40, 60))
        tracker.set_tags({"phase": "outage"})
        tracker.log_text("written while the store was down", "outage.txt")
        _eventually(lambda: _records(caplog, "unreachable"), "warning about the outage")
        log_steps(tracker, range(60, 80))
        assert max(latencies[20:]) < 0.5, f"a logging call took {max(latencies[20:]):.3f} s while the store was down"

        server.start()  # same port, same backend store and artifact root: the run exists again
        _eventually(lambda: len(steps_on_server(run_id)) == 80, "the buffered steps on the restarted server")
        log_steps(tracker, range(80, 90))

    assert steps_on_server(run_id) == list(range(90))  # every step exactly once, in order
    assert [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)] == [
        step / 100 for step in range(90)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage"
    assert run.data.params == {"epochs": "300"}
    assert [a.path for a in client.list_artifacts(run_id)] == ["outage.txt"]
    assert set(run.data.metrics) == {"loss", "lr"}
    assert "bad?name" in _one_line_warning(caplog, "rejected a logging call").getMessage()
    _one_line_warning(caplog, "unreachable")
    back = _records(caplog, "is back")
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert not _records(caplog, "RUNNING")


def test_ending_while_the_store_is_down_stays_within_the_retry_budget(server, caplog):
    caplog.set_level(logging.INFO, logger=OUTAGE_LOGGER)
    server.start()
    client = MlflowClient(server.url)
    tracker = Tracker(server.url, "outage", end_timeout=3.0, retry_interval=0.5, max_buffered=5)
    with pytest.raises(ZeroDivisionError, match="diverged"), tracker:  # the training's error, not tracking's
        run_id = tracker.start({}, {})
        tracker.log_metrics({"loss": 1.0}, step=0)
        _eventually(lambda: client.get_metric_history(run_id, "loss"), "step 0 on the server")
        server.kill()
        for step in range(1, 20):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_artifact(__file__)
        started = time.monotonic()
        raise ZeroDivisionError("diverged")
    ended_after = time.monotonic() - started
    assert 3.0 <= ended_after < 6.0, f"ending took {ended_after:.1f} s with a 3 s budget"
    assert not tracker.active
    message = _one_line_warning(caplog, "stays RUNNING").getMessage()
    assert run_id in message and "failed for 3 s" in message
    assert "new metrics are dropped" in _one_line_warning(caplog, "calls waiting").getMessage()

    on_server = MlflowClient(server.store).get_run(run_id)  # the dead server's own database
    assert on_server.info.status == "RUNNING"
    assert [m.step for m in MlflowClient(server.store).get_metric_history(run_id, "loss")] == [0]


def test_a_call_the_store_rejects_is_dropped_and_the_rest_goes_on(tmp_path, caplog):
    uri = default_tracking_uri(tmp_path)
    with Tracker(uri, "outage") as tracker:
        run_id = tracker.start({"lr": 0.1}, {})
        tracker.log_params({"lr": 0.2})  # a param cannot change: the store rejects it (INVALID_PARAMETER_VALUE)
        tracker.log_params({"lr": 0.3})
        tracker.log_metrics({"loss": 0.5}, step=1)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    assert "Changing param values is not allowed" in _one_line_warning(caplog, "rejected a logging call").getMessage()
