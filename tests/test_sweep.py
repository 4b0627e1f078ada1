"""`python run.py sweep=<name> ...`: a real three-trial sweep, each trial an MLflow run nested under one parent run;
a trial that fails (here: a config error) is recorded as a FAILED child and the sweep goes on."""
from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .helpers import run_py_to_end, tiny_folder, tiny_overrides

BAD_LR = "optim.schedule.base_lr=-1.0 must be a number > 0 (a learning rate)"


def test_grid_sweep_nests_trials_under_one_parent_run_and_survives_a_failed_trial(tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(tmp_path, tiny_folder(tmp_path), "trainer.epochs=1",
                                           "optim.schedule.warmup_epochs=0", "tracking.log_checkpoints=false")
                 if not o.startswith("paths.root=")]
    # The named sweep turns on multirun itself (no -m); the command line narrows its grid to 3 x 1 trials.
    proc = run_py_to_end(["sweep=lr_grid", "optim.schedule.base_lr=1e-3,2e-3,-1.0", "optim.optimizer.weight_decay=0.05",
                          *overrides], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"trial 2 failed: {BAD_LR}" in proc.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"  # one trial failed
    assert (parents[0].data.tags["sweep.trials"], parents[0].data.tags["sweep.failed"]) == ("3", "1")
    children = {r.info.run_name: r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id}
    # named after the swept overrides as given (weight_decay: fixed by the command line, not swept)
    assert sorted(children) == ["base_lr=-1.0", "base_lr=1e-3", "base_lr=2e-3"]
    trained = [children["base_lr=1e-3"], children["base_lr=2e-3"]]
    assert all(r.info.status == "FINISHED" for r in trained)
    assert sorted(float(r.data.params["optim.schedule.base_lr"]) for r in trained) == [1e-3, 2e-3]
    assert {r.data.params["optim.optimizer.weight_decay"] for r in trained} == {"0.05"}
    assert all("val/top1_sum" in r.data.metrics for r in trained)
    failed = children["base_lr=-1.0"]
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == f"ConfigError: {BAD_LR}"
    # One run dir per trial under a single sweep dir, each training with its own checkpoints.
    trial_dirs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/[0-9]"))
    assert len(trial_dirs) == 3 and all((d / "checkpoints" / "last.ckpt").is_file() for d in trial_dirs[:2])
    assert not (trial_dirs[2] / "checkpoints").exists()
