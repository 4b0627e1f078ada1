"""Resuming from last.ckpt: the epoch, the global step, the optimizer state and the best checkpoint carry on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conformer.train.checkpoint import read_checkpoint

from .helpers import run_py, run_py_to_end, store_uri, tiny_folder, tiny_overrides, wait_until

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6  # 96 tiny train images / batch 16
# Monitoring the epoch number with mode=min makes epoch 1 the best and every later epoch worse, whatever the
# (random) accuracy does: "the best checkpoint survives a worse epoch" becomes deterministic.
MONITOR = ("trainer.monitor=epoch", "trainer.monitor_mode=min")
# The official per-epoch lr stepping: constant within an epoch, epoch e at the value of epoch e - 1.
PER_EPOCH_LR = "optim.schedule.interval=epoch"


def _train(root: Path, data_root: Path, *extra: str) -> str:
    """`python run.py` (a fresh process compiles twice as fast as a second graph in a test process)."""
    result = run_py_to_end(tiny_overrides(root, data_root, f"tracking.uri={store_uri(root)}", *MONITOR, PER_EPOCH_LR,
                                          *extra), root)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _state_step(path: Path) -> int:
    tensors, _ = read_checkpoint(path)
    return int(tensors["optimizer.state_step"].asnumpy().reshape(-1)[0])


def test_resume_continues_the_epochs_optimizer_and_best_checkpoint(tmp_path: Path, tmp_path_factory) -> None:
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    client = MlflowClient(store_uri(tmp_path))

    _train(tmp_path, data_root, "trainer.epochs=2")
    [first] = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
    first_dir = Path(first.data.tags["run_dir"])
    first_last = first_dir / "checkpoints" / "last.ckpt"
    assert _state_step(first_last) == 2 * STEPS_PER_EPOCH

    out = _train(tmp_path, data_root, "trainer.epochs=3", f"trainer.resume={first_last}")
    assert "done: epoch 3.00 (best 1.00 at epoch 1)" in out  # the best of the first run, not epoch 3's

    # the resumed training continues the same MLflow run: same id, its params kept, metric steps going on
    (run,) = client.search_runs([first.info.experiment_id])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true" and run.data.params["trainer.resume"] == "None"
    second, resumed = Path(run.data.tags["run_dir"]), run.info.run_id
    assert second != first_dir

    # epoch 3 only, on global steps 13..18 (not epoch 1 again from step 1)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(resumed, key)]
               for key in ("epoch", "train/loss")}
    assert history["epoch"] == [(STEPS_PER_EPOCH, 1.0), (2 * STEPS_PER_EPOCH, 2.0), (3 * STEPS_PER_EPOCH, 3.0)]
    assert [step for step, _ in history["train/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    # per-epoch lr (warmup 1 epoch, base 1e-3, warmup 1e-6, min 1e-5): the first run's 2 epochs both train at the
    # warmup start, lr(0); the resumed epoch 3 of a 3-epoch schedule at lr(1) = 1e-5 + (1e-3 - 1e-5)(1 + cos(pi/3))/2
    lrs = [m.value for m in client.get_metric_history(resumed, "train/lr")]
    assert lrs == pytest.approx([1e-6] * 6 + [1e-5 + 0.99e-3 * 0.75] * 3)

    _, extra = read_checkpoint(second / "checkpoints" / "last.ckpt")
    assert (extra["epoch"], extra["step"]) == (3, 3 * STEPS_PER_EPOCH)
    assert (extra["best_metric"], extra["best_epoch"]) == (1.0, 1)
    # AdamW's step count went on from the checkpoint's 12 (a fresh optimizer would stand at 6)
    assert _state_step(second / "checkpoints" / "last.ckpt") == 3 * STEPS_PER_EPOCH

    # the resumed run dir holds the best checkpoint (epoch 1), not overwritten by the worse epoch 3
    _, best = read_checkpoint(second / "checkpoints" / "best.ckpt")
    assert best["epoch"] == 1
    assert (second / "checkpoints" / "best.ckpt").read_bytes() == (first_dir / "checkpoints" / "best.ckpt").read_bytes()
    artifacts = {a.path for a in client.list_artifacts(resumed, "checkpoints")}
    assert artifacts == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    assert "resumed from" in (second / "train.log").read_text()


def test_a_run_killed_with_sigkill_resumes_to_bit_identical_weights(tmp_path: Path, tmp_path_factory) -> None:
    """kill -9 in epoch 2 of 3, then `trainer.resume=auto`: the same final weights, bit for bit, as a run that was
    never interrupted, and one MLflow run whose metric steps go on."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    common = ("trainer.epochs=3", "data.num_workers=1", "trainer.log_every_n_steps=1")

    def overrides(root: Path, *extra: str) -> list[str]:
        return tiny_overrides(root, data_root, f"tracking.uri={store_uri(root)}", *common, *extra)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for root in (reference, killed):
        root.mkdir()
    result = run_py_to_end(overrides(reference), reference)
    assert result.returncode == 0, result.stderr[-3000:]

    proc = run_py(overrides(killed), killed)
    try:
        wait_until(lambda: any("epoch 2 step 1/6" in log.read_text()
                               for log in killed.glob("outputs/*/*/train.log")), proc, "epoch 2 under way")
    finally:
        proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
        proc.communicate(timeout=30)
    (first_dir,) = [path.parents[1] for path in killed.glob("outputs/*/*/checkpoints/last.ckpt")]
    assert read_checkpoint(first_dir / "checkpoints" / "last.ckpt")[1]["epoch"] in (1, 2)

    result = run_py_to_end(overrides(killed, "trainer.resume=auto"), killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming the newest checkpoint of this config, {first_dir}" in result.stdout

    def final_weights(root: Path) -> dict:
        (newest,) = sorted(root.glob("outputs/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
        tensors, extra = read_checkpoint(newest)
        assert extra["epoch"] == 3
        return {name: t.asnumpy() for name, t in tensors.items()}

    expected, resumed = final_weights(reference), final_weights(killed)
    assert expected.keys() == resumed.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)

    client = MlflowClient(store_uri(killed))
    (run,) = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch")][-1] == (18, 3.0)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == sorted(
        {m.step for m in client.get_metric_history(run.info.run_id, "epoch")})
