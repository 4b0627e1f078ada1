"""The debug config group and the live progress bar, on real tiny trainings."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .helpers import RUN_PY, clean_env, sqlite_uri, store_uri, tiny_folder, tiny_overrides, train_in_process

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(args: list[str], project_root: Path, timeout: float = 300) -> tuple[int, str]:
    """`python run.py <args>` with a pseudo-terminal as stdout and stderr: (exit code, what the terminal showed)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=project_root, env=clean_env(project_root),
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(timeout=timeout), ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_profile_run_in_a_terminal_shows_a_bar_and_logs_the_profile_to_the_debug_experiment(tmp_path: Path) -> None:
    data_root = tiny_folder(tmp_path)
    code, screen = run_in_terminal(tiny_overrides(tmp_path, data_root, "debug=profile", "trainer.profile_steps=2",
                                                  "trainer.limit_train_batches=4", "trainer.log_every_n_steps=2"),
                                   tmp_path)
    assert code == 0, screen[-3000:]
    # The bar (rich: "epoch 1/1 ━━━ 4/4 0:00:0x loss ... img_s ... eta ...") replaces the step lines on the terminal.
    assert re.search(r"epoch 1/1 .*4/4 .*loss \d+\.\d{4} +lr \S+ +img_s \d+ +eta \d:\d\d:\d\d", screen), screen[-3000:]
    assert "epoch 1 step 2/4" not in screen
    assert "compiling the train step" in screen and "epoch 1/1  train loss" in screen
    train_log = next((tmp_path / "outputs").rglob("train.log")).read_text()
    assert "epoch 1 step 2/4" in train_log and "epoch 1 step 4/4" in train_log  # the file keeps every line
    assert "profile of the train step, top op types" in train_log

    client = MlflowClient(sqlite_uri(tmp_path / "mlflow.db"))
    experiment = client.get_experiment_by_name("debug")
    assert experiment is not None and client.get_experiment_by_name("conformer") is None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/epoch")] == [4]  # limit_train_batches
    run_dir = Path(run.data.tags["run_dir"])
    op_types = (run_dir / "profile" / "op_types.csv").read_text().splitlines()
    assert op_types[0].startswith("op_type,") and any(line.startswith("Conv2D") for line in op_types)
    column = op_types[0].split(",").index("total_compute_time")
    totals = [float(line.split(",")[column]) for line in op_types[1:]]
    assert len(totals) > 10 and totals == sorted(totals, reverse=True)  # the longest op types first
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "profile")}
    assert "profile/op_types.csv" in artifacts


def test_overfitting_one_batch_drives_the_loss_down(tmp_path: Path) -> None:
    _, run_dir, _ = train_in_process(tmp_path, tiny_folder(tmp_path), "debug=overfit", "trainer.epochs=2",
                                     "trainer.limit_train_batches=12", "trainer.log_every_n_steps=1",
                                     "optim.schedule.warmup_epochs=0")
    client = MlflowClient(store_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("debug").experiment_id])
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 24
    # one repeated batch: the loss falls steadily towards the label-smoothing floor (~0.3 for 3 classes)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(later <= earlier + 1e-3 for earlier, later in zip(losses[12:], losses[13:])), losses
