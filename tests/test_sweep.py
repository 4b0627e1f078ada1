"""`python run.py sweep=<name> ...`: a real two-trial sweep, each trial an MLflow run nested under one parent run."""
from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .helpers import run_py_to_end, tiny_folder, tiny_overrides


def test_grid_sweep_nests_trials_under_one_parent_run(tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(tmp_path, tiny_folder(tmp_path), "trainer.epochs=1",
                                           "optim.schedule.warmup_epochs=0", "tracking.log_checkpoints=false")
                 if not o.startswith("paths.root=")]
    # The named sweep turns on multirun itself (no -m); the command line narrows its grid to 2 x 1 trials.
    proc = run_py_to_end(["sweep=lr_grid", "optim.schedule.base_lr=1e-3,2e-3", "optim.optimizer.weight_decay=0.05",
                          *overrides], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_name for r in children) == ["train-conformer_nano-0", "train-conformer_nano-1"]
    assert sorted(float(r.data.params["optim.schedule.base_lr"]) for r in children) == [1e-3, 2e-3]
    assert {r.data.params["optim.optimizer.weight_decay"] for r in children} == {"0.05"}
    assert all("val/top1_sum" in r.data.metrics for r in children)
    # One run dir per trial under a single sweep dir, each with its own checkpoints.
    trial_dirs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/[0-9]"))
    assert len(trial_dirs) == 2 and all((d / "checkpoints" / "last.ckpt").is_file() for d in trial_dirs)
