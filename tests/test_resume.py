"""Resuming after kill -9: `trainer.resume=auto` finds the checkpoint, the training ends bit-identical to one that
was never interrupted (drop path included), and the epoch, global step, optimizer state, per-epoch lr, best
checkpoint and MLflow run carry on."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conformer.models.checkpoint_file import read_checkpoint

from .helpers import run_py, run_py_to_end, store_uri, tiny_folder, tiny_overrides, wait_until

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6  # 96 tiny train images / batch 16
# Monitoring the epoch number with mode=min makes epoch 1 the best and every later epoch worse, whatever the
# (random) accuracy does: "the best checkpoint survives a worse epoch" becomes deterministic.
MONITOR = ("trainer.monitor=train/epoch", "trainer.monitor_mode=min")
# The official per-epoch lr stepping: constant within an epoch, epoch e at the value of epoch e - 1.
PER_EPOCH_LR = "optim.schedule.interval=epoch"


def _state_step(path: Path) -> int:
    tensors, _ = read_checkpoint(path)
    return int(tensors["optimizer.state_step"].asnumpy().reshape(-1)[0])


# drop path on: its masks come from (seed, rank, step), so the resumed epochs draw the masks they would have
COMMON = ("trainer.epochs=3", "data.num_workers=1", "trainer.log_every_n_steps=1", "model.drop_path_rate=0.2",
          *MONITOR, PER_EPOCH_LR)


def _overrides(root: Path, data_root: Path, *extra: str) -> list[str]:
    return tiny_overrides(root, data_root, f"tracking.uri={store_uri(root)}", *COMMON, *extra)


def _final_checkpoint(root: Path) -> Path:
    return sorted(root.glob("outputs/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final weights of the 3-epoch training that nothing interrupts."""
    root = tmp_path_factory.mktemp("reference")
    result = run_py_to_end(_overrides(root, tiny_folder(tmp_path_factory.getbasetemp())), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_checkpoint(_final_checkpoint(root))[0]


def _assert_same_weights(resumed: dict, expected: dict) -> None:
    assert expected.keys() == resumed.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name].asnumpy(), expected[name].asnumpy(), err_msg=name)


def test_a_run_killed_with_sigkill_resumes_to_bit_identical_weights(tmp_path: Path, tmp_path_factory,
                                                                   uninterrupted: dict) -> None:
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    killed = tmp_path / "killed"
    killed.mkdir()

    def overrides(root: Path, *extra: str) -> list[str]:
        return _overrides(root, data_root, *extra)

    proc = run_py(overrides(killed), killed)
    try:
        wait_until(lambda: any("epoch 2 step 1/6" in log.read_text()
                               for log in killed.glob("outputs/*/*/train.log")), proc, "epoch 2 under way")
    finally:
        proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
        proc.communicate(timeout=30)
    (first_dir,) = [path.parents[1] for path in killed.glob("outputs/*/*/checkpoints/last.ckpt")]
    checkpoint_epoch = read_checkpoint(first_dir / "checkpoints" / "last.ckpt")[1]["epoch"]
    assert checkpoint_epoch in (1, 2)
    if checkpoint_epoch == 1:  # as if the kill came after epoch 2's metrics were logged, before its checkpoint
        client = MlflowClient(store_uri(killed))
        (run,) = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
        if 2 * STEPS_PER_EPOCH not in {m.step for m in client.get_metric_history(run.info.run_id, "train/epoch")}:
            client.log_metric(run.info.run_id, "train/epoch", 2.0, step=2 * STEPS_PER_EPOCH)

    result = run_py_to_end(overrides(killed, "trainer.resume=auto"), killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming the newest checkpoint of this config, {first_dir}" in result.stdout
    assert "done: train/epoch 3.00 (best 1.00 at epoch 1)" in result.stdout  # the first process's best

    _assert_same_weights(read_checkpoint(_final_checkpoint(killed))[0], uninterrupted)

    # the resumed process wrote a new run dir: its last.ckpt is at epoch 3 with AdamW's step count going on, its
    # best.ckpt the first process's (epoch 1), not overwritten by the worse epochs
    second = _final_checkpoint(killed).parents[1]
    assert second != first_dir and "resumed from" in (second / "train.log").read_text()
    _, extra = read_checkpoint(second / "checkpoints" / "last.ckpt")
    assert (extra["epoch"], extra["step"], extra["best_metric"], extra["best_epoch"]) == (3, 18, 1.0, 1)
    assert _state_step(second / "checkpoints" / "last.ckpt") == 3 * STEPS_PER_EPOCH
    assert (second / "checkpoints" / "best.ckpt").read_bytes() == (first_dir / "checkpoints" / "best.ckpt").read_bytes()

    # one MLflow run, continued: same id, its params kept, metric steps going on
    client = MlflowClient(store_uri(killed))
    (run,) = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert "trainer.resume" not in run.data.params and run.data.tags["run_dir"] == str(second)
    epochs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/epoch")]
    assert epochs[-1] == (3 * STEPS_PER_EPOCH, 3.0) and [s for s, _ in epochs] == sorted({s for s, _ in epochs})
    # per-epoch lr (warmup 1 epoch, base 1e-3, warmup 1e-6, min 1e-5): epochs 1 and 2 train at the warmup start,
    # lr(0); epoch 3 at lr(1) = 1e-5 + (1e-3 - 1e-5)(1 + cos(pi/3))/2, whichever process ran them
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert sorted(lrs) == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert [lrs[step] for step in sorted(lrs)] == pytest.approx([1e-6] * 12 + [1e-5 + 0.99e-3 * 0.75] * 6)
    # its checkpoints are the run's artifacts, stored once: the resumed run dir's files under a second name
    artifacts = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    assert sorted(p.name for p in artifacts.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert os.path.samefile(artifacts / name, second / "checkpoints" / name), name
    # as one uninterrupted training would have left it: no step logged twice (the killed process had logged epoch 2's
    # first steps), and the train.log artifact holds both parts
    losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(losses) == list(range(1, 3 * STEPS_PER_EPOCH + 1)), losses
    log = Path(client.download_artifacts(run.info.run_id, "train.log", str(tmp_path))).read_text()
    assert "epoch 1/3" in log and "resumed from" in log and "done: train/epoch 3.00" in log
    assert log.index("epoch 1/3") < log.index("resumed from") < log.index("done: train/epoch 3.00")

    # resuming the finished training again: nothing left to train, and the run still points at its checkpoints
    again = run_py_to_end(overrides(killed, "trainer.resume=auto"), killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing left to train" in again.stdout + again.stderr
    run = client.get_run(run.info.run_id)
    assert (Path(run.data.tags["run_dir"]) / "checkpoints" / "last.ckpt").is_file()


def test_a_kill_after_a_step_checkpoint_resumes_mid_epoch_to_bit_identical_weights(
        tmp_path: Path, tmp_path_factory, uninterrupted: dict) -> None:
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    # step 7 is epoch 2's first; the next write of last.ckpt is epoch 2's own, 5 steps (~150 ms) later: the log is
    # polled every 5 ms and the process stopped (SIGSTOP) the moment the line shows, then killed
    every = ("trainer.save_every_n_steps=7",)
    proc = run_py(_overrides(tmp_path, data_root, *every), tmp_path)
    try:
        wait_until(lambda: any("step checkpoint: epoch 2 step 1/6 -> last.ckpt" in log.read_text()
                               for log in tmp_path.glob("outputs/*/*/train.log")), proc, "the step-7 checkpoint",
                   poll=0.005)
        proc.send_signal(signal.SIGSTOP)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    _, extra = read_checkpoint(last)
    assert (extra["epoch"], extra["epoch_step"], extra["step"]) == (1, 1, 7)
    assert extra["best_epoch"] == 1  # the epoch-1 checkpoint's best rides along

    result = run_py_to_end(_overrides(tmp_path, data_root, "trainer.resume=auto"), tmp_path)  # config matches
    assert result.returncode == 0, result.stderr[-3000:]
    second = _final_checkpoint(tmp_path).parents[1]
    log = (second / "train.log").read_text()
    assert "resumed from" in log and "epoch 2 step 2/6" in log and "epoch 2 step 1/6" not in log
    _, extra = read_checkpoint(second / "checkpoints" / "last.ckpt")
    assert (extra["epoch"], extra["step"], extra.get("epoch_step", 0)) == (3, 18, 0)
    _assert_same_weights(read_checkpoint(second / "checkpoints" / "last.ckpt")[0], uninterrupted)
