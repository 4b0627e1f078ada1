"""`python run.py -m ...`: a real two-trial sweep, each trial an MLflow run nested under one parent run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "trainer.epochs=1", "optim.schedule.warmup_epochs=0", "trainer.log_every_n_steps=5",
        "tracking.log_checkpoints=false"]


def test_grid_sweep_nests_trials_under_one_parent_run(tmp_path: Path) -> None:
    env = {**os.environ, "CONFORMER_PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "optim.schedule.base_lr=1e-3,2e-3", *TINY],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parents[0].info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(float(r.data.params["optim.schedule.base_lr"]) for r in children) == [1e-3, 2e-3]
    assert all("val/top1_sum" in r.data.metrics for r in children)
    # One run dir per trial under a single sweep dir, each with its own checkpoints.
    trial_dirs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/[0-9]"))
    assert len(trial_dirs) == 2 and all((d / "checkpoints" / "last.ckpt").is_file() for d in trial_dirs)
