"""Shared bits of the benchmarks: machine description and JSON results."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mindspore

    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": platform.python_version(), "mindspore": mindspore.__version__}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return path


def log_to_mlflow(uri: str, run_name: str, params: dict[str, object], metrics: dict[str, float]) -> str:
    """One run in the experiment `benchmarks` of the store at `uri` (params, metrics, machine tags); its id."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("benchmarks")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("benchmarks")
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={f"machine.{key}": str(value) for key, value in machine().items()})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
