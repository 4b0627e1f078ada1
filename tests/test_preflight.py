"""task=preflight: every worker started as the job starts them, the reference vectors, the collectives and the
timings in one table (and in MLflow); a machine without the configured devices is refused before any process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conformer.tasks.preflight import RankResult, format_report, preflight_report

from .helpers import compose_config, run_py_to_end, tiny_folder, tiny_overrides

pytestmark = pytest.mark.slow


def preflight_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("preflight")
    assert experiment is not None, "no MLflow experiment 'preflight'"
    return client.search_runs([experiment.experiment_id])


def the_report(root: Path) -> dict:
    reports = list((root / "outputs").rglob("preflight.json"))
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text())


@pytest.mark.distributed
def test_two_workers_on_mindspores_ops_with_amp_pass_and_report_against_the_seed(tmp_path: Path) -> None:
    """The device path as an 8-card Ascend job runs it, on 2 CPU workers: MindSpore's ops, mixed precision (O2: the
    level whose wrappers once crashed the network; O1's source rewrite doubles this test's time and runs in
    test_amp), dynamic loss scaling, gradients and the overflow decision all-reduced; nothing of the project's
    kernels is built (no compiler is there to build them)."""
    args = tiny_overrides(tmp_path, tiny_folder(tmp_path), "task=preflight", "hardware=cpu_x2",
                          "hardware.kernels=mindspore", "hardware.amp_level=O2", "trainer.loss_scale=dynamic",
                          "task.steps=2", "task.pipeline_batches=2")
    cache = tmp_path / "xdg-cache"
    result = run_py_to_end(args, tmp_path, timeout=600, env={"XDG_CACHE_HOME": str(cache), "CXX": "no-such-g++"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (cache / "conformer" / "kernels").exists() and "C++ compiler" not in result.stdout + result.stderr
    report = the_report(tmp_path)
    assert report["hardware"] == "cpu_x2" and report["amp_level"] == "O2"
    assert report["kernels"] == "mindspore (mindspore)" and report["batch_per_card"] == 16
    assert len(report["ranks"]) == 2
    checks = {name: (finding, ok) for name, finding, ok in report["checks"]}
    assert set(checks) == {"devices", "workers", "reference logits", "all-reduce", "overflow decision"}
    assert all(ok for _, ok in checks.values()), checks
    assert checks["workers"][0] == "2 of 2 answered"
    for rank in report["ranks"]:
        assert 0 < rank["parity_error"] < 2e-2  # float16 logits against the official float32 ones
        assert rank["all_reduce_ok"] and rank["overflow_agreement_ok"]
        assert rank["step_ms"] > 0 and rank["pipeline_images_per_s"] > 0
    assert report["images_per_s_per_card"] == pytest.approx(16 / (report["step_ms"] / 1000))
    table = result.stdout
    assert "reference logits   ok" in table and "overflow decision  ok" in table
    assert "train step, ms" in table and "388.7" in table and "329.3" in table

    (run,) = preflight_runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["preflight"] == "passed"
    assert run.data.metrics["preflight/step_ms"] == pytest.approx(report["step_ms"], rel=1e-6)
    assert run.data.metrics["preflight/checks_failed"] == 0
    artifacts = {item.path for item in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(
        run.info.run_id)}
    assert {"preflight.json", "preflight.txt"} <= artifacts


def test_a_failed_check_is_named_in_the_table_and_fails_the_report() -> None:
    cfg = compose_config(["task=preflight", "hardware=cpu_x2"])
    good = RankResult(parity_error=3e-7, all_reduce_ok=True, overflow_agreement_ok=True, step_ms=100.0,
                      pipeline_images_per_s=500.0)
    bad = RankResult(parity_error=0.3, all_reduce_ok=False, overflow_agreement_ok=False, step_ms=300.0,
                     pipeline_images_per_s=100.0)
    report = preflight_report(cfg, [good, bad], batch_size=64, devices=[("devices", "CPU, 2 cores", True)])
    failed = [name for name, _, ok in report["checks"] if not ok]
    assert failed == ["reference logits", "all-reduce", "overflow decision"]
    assert report["step_ms"] == 200.0 and report["images_per_s_per_card"] == pytest.approx(320.0)
    table = format_report(report)
    assert "reference logits   FAIL   max rel. error 3.00e-01 (tolerance 1e-04 at AMP O0)" in table
    assert "all-reduce         FAIL   wrong sum on ranks [1]" in table
    assert "train img/s per card" in table and "0.972" in table  # 320 / 329.3 of the seed


def test_an_ascend_preflight_without_cards_is_one_line_before_any_process(tmp_path: Path) -> None:
    result = run_py_to_end([f"paths.root={tmp_path}", "task=preflight", "hardware=ascend8"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "config error: hardware=ascend8 needs Ascend devices, and this machine has none (/dev/davinci* not found): "
        "use hardware=cpu, or hardware.dry_run=true to only print the launch plan"]
    assert not list((tmp_path / "outputs").rglob("msrun")) and not (tmp_path / "mlflow.db").exists()
