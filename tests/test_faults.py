"""Faults beyond the happy path, with real processes: secrets in the tracking URI, signals, links in a dataset,
odd file names, resume=auto among broken checkpoints."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mindspore import nn
from mlflow import MlflowClient

from conformer.models.checkpoint_file import save_checkpoint
from conformer.runtime.hardware import ProcessGroup
from conformer.runtime.launch import free_port
from conformer.tasks.common import RunContext
from conformer.tasks.train import _resume_from, config_fingerprint
from conformer.tracking.store import close_runs_of_dead_processes
from conformer.tracking.tracker import FALLBACK_TAG

from .helpers import compose_config, mlflow_server, run_py, run_py_to_end, stop, tiny_folder, tiny_overrides, wait_until

pytestmark = pytest.mark.slow
SECRET = "pw-s3cret-42"


def _files_with(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _only_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


# ---------------------------------------------------------------------------------------------------- secrets
def test_a_password_in_the_tracking_uri_reaches_no_log_tag_artifact_or_file(tmp_path: Path, tmp_path_factory) -> None:
    """A real `mlflow server` on 127.0.0.1 addressed as http://alice:<password>@127.0.0.1:<port> (MLflow sends the
    user info as Basic auth): the health check passes, the run FINISHES, and the password is in no file under the
    project root (run dir, train.log, .hydra/*.yaml, the local store), no file of the server (its store and
    artifacts: tags, params, config.yaml, overrides.txt, train.log), no console line. Then with the server gone and
    tracking.fallback_to_local=true: the fallback tag and log name the store without the password."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as server:
        uri = server.url.replace("http://", f"http://alice:{SECRET}@")
        result = run_py_to_end(tiny_overrides(tmp_path, data_root, f"tracking.uri={uri}", "trainer.epochs=1"),
                               tmp_path, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(server.url)
        run = _only_run(client)
        assert run.info.status == "FINISHED"
        assert f"tracking.uri=http://***@127.0.0.1:{server.port}" in run.data.tags["overrides"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "overrides.txt", "train.log"} <= artifacts
    run_dir = Path(run.data.tags["run_dir"])
    assert "http://***@127.0.0.1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert SECRET not in result.stdout + result.stderr
    assert not _files_with(tmp_path, SECRET)  # the project root and the server's store and artifacts

    # the same store, now down, with the fallback to the local store
    port = free_port()
    fallback_root = tmp_path / "fallback"
    fallback_root.mkdir()
    result = run_py_to_end(tiny_overrides(fallback_root, data_root, f"tracking.uri=http://alice:{SECRET}@127.0.0.1:"
                                          f"{port}", "tracking.fallback_to_local=true", "trainer.epochs=1"),
                           fallback_root, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _only_run(MlflowClient(f"sqlite:///{fallback_root / 'mlflow.db'}"))
    assert run.data.tags[FALLBACK_TAG] == f"http://***@127.0.0.1:{port}"
    assert SECRET not in result.stdout + result.stderr
    assert not _files_with(fallback_root, SECRET)


def test_msrun_workers_get_a_secret_tracking_uri_from_the_environment_not_their_command_line(tmp_path: Path) -> None:
    """msrun prints and logs each worker's command line: a tracking URI with a password goes to them as
    MLFLOW_TRACKING_URI instead (shown redacted by the dry run)."""
    result = run_py_to_end(["hardware=cpu_x2", "hardware.dry_run=true", "tracking.fallback_to_local=true",
                            f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{free_port()}"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    assert "MLFLOW_TRACKING_URI=http://***@127.0.0.1:" in result.stdout
    command = next(line for line in result.stdout.splitlines() if "msrun --worker_num=2" in line)
    assert "tracking.uri" not in command


# ---------------------------------------------------------------------------------------------------- signals
def _training_started(root: Path) -> bool:
    return any("train step compiled and run once" in log.read_text() for log in root.glob("outputs/*/*/train.log"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_or_a_closed_terminal_during_training_ends_the_run_killed(sig: int, code: int, tmp_path: Path,
                                                                        tmp_path_factory) -> None:
    """Ctrl-C reaches the whole foreground process group (the training and MindSpore's dataset processes): exit 130
    and "received SIGINT", not the SIGTERM MindSpore's clean-up process sends its parent afterwards. A closed
    terminal (SIGHUP) stops the training like SIGTERM: exit 129, the MLflow run KILLED."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    proc = run_py(tiny_overrides(tmp_path, data_root, "trainer.epochs=50", "data.num_workers=2",
                                 "data.train_transform.auto_augment=rand-m9-mstd0.5-inc1"),  # worker processes
                  tmp_path, start_new_session=True,  # as a terminal's job: SIGINT not ignored (as under `cmd &`)
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(lambda: _training_started(tmp_path), proc, "the training running", timeout=300)
        time.sleep(1.0)  # a few steps into the loop
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc, signal.SIGKILL, group=True)
    name = signal.Signals(sig).name
    assert proc.returncode == code, err[-3000:]
    assert re.match(rf"interrupted \((received )?{name}", err.strip().splitlines()[-1]), err[-3000:]
    assert "Traceback" not in err
    assert _only_run(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")).info.status == "KILLED"


# ---------------------------------------------------------------------------------------------------- resume=auto
def test_resume_auto_skips_unreadable_checkpoints_naming_them(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    """Newer than this config's last.ckpt under outputs/: an empty one, a garbage one and another config's. The
    search warns about the two it cannot read, names them, and resumes this config's."""
    cfg = compose_config([f"paths.root={tmp_path}", "tracking=disabled", "trainer.resume=auto"])
    fingerprint = config_fingerprint(cfg)
    outputs = tmp_path / "outputs"
    ours = save_checkpoint(nn.Dense(2, 2), outputs / "a" / "checkpoints" / "last.ckpt",
                           extra={"config_fingerprint": fingerprint, "epoch": 1})
    other = save_checkpoint(nn.Dense(2, 2), outputs / "b" / "checkpoints" / "last.ckpt",
                            extra={"config_fingerprint": "another config", "epoch": 1})
    empty, junk = outputs / "c" / "checkpoints" / "last.ckpt", outputs / "d" / "checkpoints" / "last.ckpt"
    for path, data in ((empty, b""), (junk, np.random.default_rng(0).bytes(300))):
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    for age, path in enumerate((junk, empty, other, ours)):  # ours the oldest
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    ctx = RunContext(cfg=cfg, run_dir=outputs / "new", project_root=tmp_path, group=ProcessGroup())
    with caplog.at_level(logging.WARNING):
        assert _resume_from(ctx, fingerprint) == ours
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert f"skipping {empty}: cannot read checkpoint {empty}: the file is empty" in skipped[1]
    assert f"skipping {junk}: cannot read checkpoint {junk}: Failed to read the checkpoint file" in skipped[0]


# ---------------------------------------------------------------------------------------------------- one owner
def test_a_training_in_progress_has_one_owner_that_the_orphan_check_and_a_second_resume_respect(
        tmp_path: Path, tmp_path_factory) -> None:
    """A training killed (SIGKILL) and resumed continues its MLflow run, whose start time is older than the resuming
    process: the orphan check every start makes leaves it RUNNING (it asks the run dir's lock, held by the live
    owner); a second trainer.resume=auto of the same config stops with one line naming the owner's pid."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    args = tiny_overrides(tmp_path, data_root, "trainer.epochs=50")
    first = run_py(args, tmp_path, start_new_session=True)
    try:
        wait_until(lambda: any(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")), first, "a last.ckpt")
    finally:
        stop(first, signal.SIGKILL, group=True)
    resumed = run_py([*args, "trainer.resume=auto"], tmp_path, start_new_session=True)
    try:
        wait_until(lambda: sum(_training_started_in(log) for log in tmp_path.glob("outputs/*/*/train.log")) == 2,
                   resumed, "the resumed training running", timeout=300)
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = _only_run(client)
        assert run.data.tags["pid"] == str(resumed.pid) and run.data.tags.get("resumed") == "true"
        assert close_runs_of_dead_processes(client) == []  # what every run's start does
        assert client.get_run(run.info.run_id).info.status == "RUNNING"

        second = run_py_to_end([*args, "trainer.resume=auto"], tmp_path, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("config error: trainer.resume=auto: the training in ") and \
            f"is in progress (pid {resumed.pid} owns it)" in last, last
        assert "Traceback" not in second.stderr
        assert resumed.poll() is None
    finally:
        stop(resumed, signal.SIGTERM)
    assert resumed.returncode == 143
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and "error" not in run.data.tags


def _training_started_in(log: Path) -> bool:
    return "train step compiled and run once" in log.read_text()


# ---------------------------------------------------------------------------------------------------- one line
def test_an_empty_checkpoint_and_a_nan_loss_are_one_line_also_in_train_log(tmp_path: Path, tmp_path_factory) -> None:
    """Faults of the run, not bugs: one `error:` line (no traceback; HYDRA_FULL_ERROR=1 shows it), also in
    train.log. An empty .ckpt used to get MindSpore's misleading `filter_prefix` message."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    result = run_py_to_end(["task=eval", f"task.checkpoint={empty}", "tracking=disabled",
                            f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot read checkpoint {empty}: the file is empty (0 bytes; a write cut short?) "
        "(HYDRA_FULL_ERROR=1 shows the traceback)")
    assert "Traceback" not in result.stderr and "filter_prefix" not in result.stderr
    assert f"cannot read checkpoint {empty}" in (tmp_path / "eval" / "train.log").read_text()

    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    result = run_py_to_end(tiny_overrides(tmp_path, data_root, "trainer.epochs=2", "optim.schedule.base_lr=1e30",
                                          "optim.schedule.warmup_epochs=0", f"hydra.run.dir={tmp_path / 'nan'}"),
                           tmp_path, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is nan at epoch 1, step ") and last.endswith("shows the traceback)"), last
    assert "Traceback" not in result.stderr
    assert last.split(" (HYDRA_FULL_ERROR")[0] in (tmp_path / "nan" / "train.log").read_text()
    assert _only_run(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")).info.status == "FAILED"


def test_a_run_folder_that_cannot_be_written_is_one_line_before_hydra_makes_it(tmp_path: Path) -> None:
    """Hydra's own failure to make the run dir was ~40 lines of traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    as_root = os.geteuid() == 0  # root writes through permissions: the folder is made immutable instead
    subprocess.run(["chattr", "+i", str(locked)], check=True) if as_root else locked.chmod(0o555)
    try:
        result = run_py_to_end(["tracking=disabled"], locked, timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True) if as_root else locked.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: cannot write the run dir {locked}/outputs/"), last
    assert "Traceback" not in result.stderr
