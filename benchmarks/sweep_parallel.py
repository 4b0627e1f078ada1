"""A 4-trial learning-rate grid on Hydra's joblib launcher with n_jobs=2 against n_jobs=1 on this machine: the wall
time of each whole sweep (`python run.py -m ...`, start to exit) and each trial's objective, which must not depend on
how many trials ran at once. Rounds alternate the two settings (1, 2, 2, 1, ...) so that a busy machine weighs on
both alike; the median of each goes to benchmarks/results/sweep_parallel.json.

    python benchmarks/sweep_parallel.py [--rounds 2] [--epochs 1]

Tiny trainings (conformer_nano cut to one stage, 16 px images, 3 classes), compile cache off: each trial compiles
its graphs, as a sweep of new configs does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATES = "5e-4,1e-3,2e-3,4e-3"


def overrides(root: Path, data: Path, epochs: int) -> list[str]:
    return [f"paths.root={root}", "data=folder", f"data.source.root={data}", "data.batch_size=16",
            "+model.depth=3", "data.image_size=16", f"trainer.epochs={epochs}", "optim.schedule.warmup_epochs=0",
            "tracking.log_checkpoints=false", "compile_cache=false", "trainer.progress_bar=false"]


def run_sweep(n_jobs: int, data: Path, epochs: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one sweep and each trial's objective by learning rate (read from its MLflow store)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args = ["-m", f"optim.schedule.base_lr={LEARNING_RATES}", "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={n_jobs}", *overrides(root, data, epochs)]
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=root, check=True, capture_output=True,
                       env={**os.environ, "CONFORMER_PROJECT_ROOT": str(root)})
        wall = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        objectives = {run.data.params["optim.schedule.base_lr"]: run.data.metrics["val/top1_sum"]
                      for run in runs if run.data.tags.get("sweep") != "parent"}
    return wall, dict(sorted(objectives.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from conformer.data.sources import write_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        write_image_folder(data, num_classes=3, train_per_class=32, val_per_class=8, size=(16, 16), ext=".png")
        walls: dict[int, list[float]] = {1: [], 2: []}
        objectives: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        order = [n for r in range(args.rounds) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
        for n_jobs in order:
            wall, values = run_sweep(n_jobs, data, args.epochs)
            walls[n_jobs].append(wall)
            objectives[n_jobs].append(values)
            print(f"n_jobs={n_jobs}: {wall:.1f} s, objectives {values}", flush=True)
    median = {n: statistics.median(w) for n, w in walls.items()}
    same = all(values == objectives[1][0] for runs in objectives.values() for values in runs)
    result = {"trials": len(LEARNING_RATES.split(",")), "epochs": args.epochs, "order": order,
              "wall_s": {f"n_jobs={n}": [round(w, 1) for w in walls[n]] for n in walls},
              "median_wall_s": {f"n_jobs={n}": round(median[n], 1) for n in median},
              "speedup_n_jobs_2": round(median[1] / median[2], 2),
              "objectives": {f"n_jobs={n}": objectives[n] for n in objectives},
              "same_objectives_per_trial": same}
    path = write_result("sweep_parallel", result)
    print(f"n_jobs=2 is {result['speedup_n_jobs_2']}x faster than n_jobs=1 (median of {args.rounds}); "
          f"same objectives per trial: {same} -> {path}")


if __name__ == "__main__":
    main()
