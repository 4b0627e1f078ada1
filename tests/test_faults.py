"""Faults beyond the happy path, with real processes: secrets in the tracking URI, signals, one owner per run,
resume=auto among broken checkpoints, one-line errors, a disk too small or full.

A `python run.py` training costs ~15 s here (imports, the tiny step from the compile cache, MLflow), so a test that
needs several trainings makes each process serve more than one probe where they do not interfere."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mindspore import nn
from mlflow import MlflowClient

from conformer.models.checkpoint_file import read_checkpoint, save_checkpoint
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
    artifacts: tags, params, config.yaml, overrides.txt, train.log), no console line. (The same store down, with
    tracking.fallback_to_local=true: `test_a_full_disk_at_epoch_2_keeps_epoch_1_and_resume_auto_finishes`.)"""
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
def _training_started_in(log: Path) -> bool:
    return "train step compiled and run once" in log.read_text()


def _assert_interrupted(proc: subprocess.Popen, err: str, sig: int, code: int) -> None:
    """Exit 128 + signal, and the last line says which signal; no traceback."""
    name = signal.Signals(sig).name
    assert proc.returncode == code, err[-3000:]
    assert re.match(rf"interrupted \((received )?{name}", err.strip().splitlines()[-1]), err[-3000:]
    assert "Traceback" not in err


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
def test_ctrl_c_then_a_resume_that_owns_the_run_then_a_closed_terminal(tmp_path: Path, tmp_path_factory) -> None:
    """Three probes on two trainings (with dataset worker processes):
    1. Ctrl-C reaches the whole foreground process group (the training and MindSpore's dataset processes) during
       training: exit 130 and "received SIGINT", not the SIGTERM MindSpore's clean-up process sends its parent
       afterwards; the MLflow run KILLED.
    2. `trainer.resume=auto` continues that MLflow run, whose start time is older than the resuming process: the
       orphan check every start makes leaves it RUNNING (it asks the run dir's lock, held by the live owner); a
       second trainer.resume=auto of the same config stops with one line naming the owner's pid.
    3. A closed terminal (SIGHUP) stops the resumed training like SIGTERM: exit 129, the MLflow run KILLED without
       an `error` tag."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    args = tiny_overrides(tmp_path, data_root, "trainer.epochs=50", "data.num_workers=2",
                          "data.train_transform.auto_augment=rand-m9-mstd0.5-inc1")  # worker processes
    first = run_py(args, tmp_path, start_new_session=True,  # as a terminal's job: SIGINT not ignored (`cmd &`)
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:  # an epoch done: training, a few steps into the loop, with a checkpoint to resume
        wait_until(lambda: any(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")), first, "a last.ckpt",
                   timeout=300)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        stop(first, signal.SIGKILL, group=True)
    _assert_interrupted(first, err, signal.SIGINT, 130)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _only_run(client).info.status == "KILLED"

    resumed = run_py([*args, "trainer.resume=auto"], tmp_path, start_new_session=True)
    try:
        wait_until(lambda: sum(_training_started_in(log) for log in tmp_path.glob("outputs/*/*/train.log")) == 2,
                   resumed, "the resumed training running", timeout=300)
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

        resumed.send_signal(signal.SIGHUP)
        _, err = resumed.communicate(timeout=120)
    finally:
        stop(resumed, signal.SIGKILL, group=True)
    _assert_interrupted(resumed, err, signal.SIGHUP, 129)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and "error" not in run.data.tags


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


# ---------------------------------------------------------------------------------------------------- disk space
def test_too_little_free_space_refuses_the_training_before_it_compiles(tmp_path: Path, tmp_path_factory) -> None:
    """The check before the first step: two checkpoints and `task.free_space_margin_mb` must fit in the run dir's
    file system. A margin 10 TB above the free space stands for a disk too small: one line naming the folder, the
    space free and the space needed, also in train.log, exit 1; nothing compiled, no checkpoint, no MLflow run."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    margin = int(free_mb) + 10 * 2**20
    run_dir = tmp_path / "run"
    result = run_py_to_end(tiny_overrides(tmp_path, data_root, f"task.free_space_margin_mb={margin}",
                                          f"hydra.run.dir={run_dir}"), tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"error: not enough free space for the checkpoints in {re.escape(str(run_dir))}: (\d+) MB free, the training "
        rf"needs about (\d+) MB \(two checkpoints of ([\d.]+) MB and task.free_space_margin_mb={margin}\): free some "
        r"space or point hydra.run.dir \(or paths.root\) elsewhere \(HYDRA_FULL_ERROR=1 shows the traceback\)", last)
    assert found, last
    free, needed, checkpoint = int(found[1]), int(found[2]), float(found[3])
    assert abs(needed - (margin + 2 * checkpoint)) <= 1 and checkpoint > 1  # conformer_nano cut to 3 blocks: ~9 MB
    assert abs(free - free_mb) < 0.05 * free_mb  # the machine's other writers move it a little
    assert "Traceback" not in result.stderr
    log = (run_dir / "train.log").read_text()
    assert last.split(" (HYDRA_FULL_ERROR")[0] in log and "compiling the train step" not in log
    assert not (run_dir / "checkpoints").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_full_disk_at_epoch_2_keeps_epoch_1_and_resume_auto_finishes(tmp_path: Path, tmp_path_factory) -> None:
    """A real ENOSPC at epoch 2's checkpoint: the temp file that its copy of best.ckpt to last.ckpt writes (every
    epoch improves on the monitored epoch number; the temp is named after the global step, 12) is a link to
    /dev/full, whose writes the kernel fails with ENOSPC, as root or not. The training stops there with one line
    naming last.ckpt, also in train.log, exit 1, the MLflow run FAILED; epoch 1's last.ckpt is intact and no temp
    file is left. `trainer.resume=auto` then finishes the training in the same MLflow run: FINISHED, every epoch's
    best/* logged once, no train step logged twice.

    The store is an unreachable server addressed with a password, with tracking.fallback_to_local=true: both
    processes log to the local store, whose fallback tag names the server without the password, and the password
    is in no file and no console line."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    port = free_port()  # nobody listens
    args = tiny_overrides(tmp_path, data_root, "trainer.epochs=4", "trainer.monitor=train/epoch",
                          "trainer.monitor_mode=max",
                          f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{port}", "tracking.fallback_to_local=true")
    run_dir = tmp_path / "outputs" / "full"  # where resume=auto looks
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    steps = 6  # per epoch
    (checkpoints / f".last.{2 * steps}.partial.ckpt").symlink_to("/dev/full")  # checkpoint._temp_name
    dev_full = os.stat("/dev/full")
    result = run_py_to_end([*args, f"hydra.run.dir={run_dir}"], tmp_path, timeout=400)
    out, err = result.stdout, result.stderr
    assert result.returncode == 1, err[-3000:]
    line = (f"error: no space left on the device writing {checkpoints / 'last.ckpt'}: free some space, then continue "
            "the training with trainer.resume=auto (its last finished epoch is kept)")
    assert err.strip().splitlines()[-1] == f"{line} (HYDRA_FULL_ERROR=1 shows the traceback)", err[-3000:]
    assert "Traceback" not in err
    log = (run_dir / "train.log").read_text()
    assert line in log and "epoch 1/4" in log and "epoch 2/4" not in log  # stopped at epoch 2's save
    _, extra = read_checkpoint(checkpoints / "last.ckpt")
    assert (extra["epoch"], extra["step"]) == (1, steps)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # the link removed too
    assert (os.stat("/dev/full").st_mode, os.stat("/dev/full").st_rdev) == (dev_full.st_mode, dev_full.st_rdev)
    assert stat.S_ISCHR(dev_full.st_mode)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _only_run(client)
    assert run.info.status == "FAILED" and run.data.tags[FALLBACK_TAG] == f"http://***@127.0.0.1:{port}"

    resumed = run_py_to_end([*args, "trainer.resume=auto"], tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the newest checkpoint of this config, {checkpoints / 'last.ckpt'}" in resumed.stdout
    assert "done: train/epoch 4.00 (best 4.00 at epoch 4)" in resumed.stdout
    run = _only_run(client)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags and run.data.tags["resumed"] == "true"
    history = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("best/epoch", "train/epoch", "train/loss")}
    assert sorted(history["best/epoch"]) == [steps, 2 * steps, 3 * steps, 4 * steps]  # epoch 2's too, once
    assert sorted(history["train/epoch"]) == [steps, 2 * steps, 3 * steps, 4 * steps]
    assert sorted(history["train/loss"]) == list(range(2, 4 * steps + 1, 2))  # every 2nd step, once
    assert SECRET not in out + err + resumed.stdout + resumed.stderr
    assert not _files_with(tmp_path, SECRET)


HUNG_CLEANUP = """
import os, signal, sys, threading, time
from conformer.runtime import signals
signals.CLEANUP_BACKSTOP_S = 1.0
if sys.argv[1] == "clean-up":
    with signals.interruptible():
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(30)
        except BaseException:
            time.sleep(600)  # a clean-up that never ends
else:  # an exit that never ends: a thread nobody joins
    threading.Thread(target=time.sleep, args=(600,)).start()
    signals.exit_within(130, 1.0)
    sys.exit(130)
"""


@pytest.mark.parametrize(("stage", "code", "line"), [
    ("clean-up", 129, "interrupted (received SIGHUP) the clean-up did not end within 1 s: stopping now"),
    ("exit", 130, "the exit did not end within 1 s: stopping now"),
])
def test_a_stopped_process_whose_clean_up_or_exit_hangs_still_ends(tmp_path: Path, stage: str, code: int,
                                                                     line: str) -> None:
    result = subprocess.run([sys.executable, "-c", HUNG_CLEANUP, stage], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == code, result.stderr[-2000:]
    assert line in result.stderr
