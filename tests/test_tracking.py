"""MLflow tracking against real stores: a SQLite file, a real `mlflow server`, a SIGTERM'd subprocess."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from conformer.errors import Interrupted
from conformer.runtime.paths import git_commit
from conformer.sweeps.callback import PARENT_FILE, SweepParentCallback, sweep_parent_run_id
from conformer.tracking import (
    NullTracker,
    Tracker,
    create_tracker,
    default_artifact_root,
    default_run_name,
    default_tracking_uri,
    flatten_config,
    resolve_tracking_uri,
    run_tags,
)
from conformer.tracking.store import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from conformer.train.curves import curves_figure, plot_curves

from .helpers import compose_config, mlflow_server, run_py_to_end

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """Project root holding the default SQLite store (created once per module: migrations take seconds)."""
    root = tmp_path_factory.mktemp("project")
    return root, default_tracking_uri(root)


@pytest.fixture
def experiment(request) -> str:
    return f"exp-{request.node.name}"


@pytest.fixture(autouse=True)
def _no_inherited_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_uri_resolution(tmp_path, monkeypatch):
    default = default_tracking_uri(tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None, tmp_path) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    assert default_artifact_root(default) == tmp_path.resolve() / "mlruns"
    monkeypatch.chdir(tmp_path)
    assert default_artifact_root("sqlite:///rel/m.db") == tmp_path.resolve() / "rel" / "mlruns"
    assert default_artifact_root("http://127.0.0.1:5000") is None


def test_flatten_config_resolves_stringifies_and_truncates():
    cfg = OmegaConf.create({
        "optim": {"optimizer": {"lr": 1e-3, "betas": [0.9, 0.999]}, "base_lr": "${optim.optimizer.lr}"},
        "model": {"name": "conformer_tiny_patch16", "drop_path": None, "pretrained": False},
        "callbacks": {}, "note": "x" * 7000,
    })
    flat = flatten_config(cfg)
    assert flat == {
        "optim.optimizer.lr": "0.001", "optim.optimizer.betas": "[0.9, 0.999]", "optim.base_lr": "0.001",
        "model.name": "conformer_tiny_patch16", "model.drop_path": "None", "model.pretrained": "False",
        "callbacks": "{}", "note": "x" * 5997 + "...",
    }
    nested = flatten_config({"data": OmegaConf.create({"size": 32, "mean": [0.5, 0.5]}), "seed": 3})
    assert nested == {"data.size": "32", "data.mean": "[0.5, 0.5]", "seed": "3"}
    with pytest.raises(ValueError, match="interpolation"):
        flatten_config(OmegaConf.create({"a": "${missing.key}"}))
    with pytest.raises(TypeError, match="mapping"):
        flatten_config([1, 2])


def test_run_records_params_metrics_artifacts_and_tags(store, experiment, tmp_path, monkeypatch, caplog):
    root, uri = store
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # Hydra may change the cwd: artifacts must not follow it
    params = flatten_config({"layer": {f"p{i}": i for i in range(250)}, "lr": 0.001})
    tags = run_tags(model="conformer_tiny_patch16", data="digits", hardware="cpu", task="train",
                    overrides=["optim.lr=0.001", "trainer.epochs=2"], git_commit="abc123", run_dir=tmp_path,
                    world_size=2)
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "a.json").write_text("{}")

    with Tracker(uri, experiment, run_name="trial-1") as tracker:
        run_id = tracker.start(params, tags)
        for step in range(3):
            tracker.log_metrics({"train/loss": 2.0 - step, "lr": 1e-3 * (step + 1)}, step=step * 10)
        tracker.log_metrics({"train/loss": float("nan"), "val/top1_sum": 0.5}, step=30)
        tracker.log_metrics({"train/loss": float("inf")}, step=40)
        tracker.log_artifact(note)
        tracker.log_artifact(folder, artifact_path="extra")
        tracker.log_text("a: 1\n", "config.yaml")
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            tracker.log_artifact(tmp_path / "missing.txt")
        with pytest.raises(TypeError, match="'val/acc' must be a number"):
            tracker.log_metrics({"val/acc": "high"}, step=1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert "'train/loss' is nan at step 30" in caplog.text

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-1"
    assert run.data.params == params and len(params) == 251
    expected_tags = {"model": "conformer_tiny_patch16", "data": "digits", "hardware": "cpu", "task": "train",
                     "overrides": "optim.lr=0.001 trainer.epochs=2", "world_size": "2"}
    assert {k: run.data.tags[k] for k in expected_tags} == expected_tags
    assert run.data.tags["mlflow.source.git.commit"] == "abc123"
    assert run.data.tags["nonfinite.train/loss"] == "30"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [(0, 2.0), (10, 1.0), (20, 0.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/top1_sum")] == [(30, 0.5)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"notes.txt", "extra", "config.yaml"}
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/a.json"]

    artifact_dir = Path(client.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://"))
    assert artifact_dir.parent == root.resolve() / "mlruns"
    assert (artifact_dir / run_id / "artifacts" / "notes.txt").read_text() == "hello"
    assert tracker.artifact_uri == run.info.artifact_uri
    assert not any(elsewhere.iterdir())
    with pytest.raises(RuntimeError, match="has ended"):
        tracker.log_metrics({"x": 1.0}, step=0)


def test_system_metrics_of_a_continued_run_go_on_from_its_last_step(store, experiment):
    root, uri = store
    with Tracker(uri, experiment, system_metrics=0.2) as first:
        run_id = first.start()
        time.sleep(1.0)
    with Tracker(uri, experiment, system_metrics=0.2) as second:
        assert second.start(resume_run_id=run_id) == run_id
        time.sleep(1.0)
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 4 and steps == sorted(set(steps)), steps  # no step logged twice


def test_exceptions_end_the_run_failed_or_killed(store, experiment):
    root, uri = store
    client = MlflowClient(uri)
    cases = [(ValueError("bad batch"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
             (Interrupted(signal.SIGTERM), "KILLED"), (SystemExit(0), "FINISHED"), (SystemExit(2), "FAILED")]
    for exc, expected in cases:
        tracker = Tracker(uri, experiment)
        with pytest.raises(type(exc)), tracker:
            tracker.start({}, {})
            raise exc
        run = client.get_run(tracker.run_id)
        assert (type(exc).__name__, run.info.status) == (type(exc).__name__, expected)
        assert run.data.tags.get("error") == ("ValueError: bad batch" if isinstance(exc, ValueError) else
                                              "SystemExit: 2" if expected == "FAILED" else None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not tracker.active


def test_sigterm_to_a_real_process_ends_its_run_killed(store, experiment, tmp_path):
    root, uri = store
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from conformer.runtime.signals import interruptible
        from conformer.tracking import Tracker
        with interruptible(), Tracker({uri!r}, {experiment!r}) as tracker:
            print(tracker.start({{"lr": 0.1}}, {{}}), flush=True)
            while True:
                tracker.log_metrics({{"beat": 1.0}}, step=0)
                time.sleep(0.2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Interrupted: received SIGTERM" in err
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_disabled_tracker_and_factory(store, experiment, monkeypatch):
    root, uri = store
    null = NullTracker()
    with null as tracker:
        assert tracker.start({"a": 1}, {"b": 2}) is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact("/does/not/matter")
        tracker.log_text("x", "x.txt")
        tracker.set_tags({"x": 1})
    assert tracker.run_id is None and not tracker.enabled
    cfg = OmegaConf.create({"enabled": True, "uri": uri, "experiment_name": experiment, "run_name": "r"})
    assert isinstance(create_tracker(cfg, root, is_main=False), NullTracker)
    assert isinstance(create_tracker(OmegaConf.merge(cfg, {"enabled": False}), root), NullTracker)
    real = create_tracker(OmegaConf.merge(cfg, {"parent_run_id": "0123abcd"}), root)
    assert isinstance(real, Tracker) and real.uri == uri and real.parent_run_id == "0123abcd"
    with pytest.raises(ValueError, match="parent run 0123abcd not found"), real:
        real.start({}, {})
    assert real.run_id is None


def test_deleted_experiment_is_a_clear_error(store, experiment):
    root, uri = store
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment(experiment))
    with pytest.raises(ValueError, match="is deleted.*mlflow experiments restore"):
        Tracker(uri, experiment).start({}, {})
    with pytest.raises(ValueError, match="experiment_name"):
        create_tracker({"uri": uri, "experiment_name": ""}, root)


def _sweep_config(uri: str, experiment: str, sweep_dir: Path):
    return OmegaConf.create({
        "tracking": {"enabled": True, "uri": uri, "experiment_name": experiment},
        "hydra": {"sweep": {"dir": str(sweep_dir)}, "job": {"name": "train"},
                  "overrides": {"task": ["optim.lr=0.1,0.01"]},
                  "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                              "params": {"optim.lr": "0.1,0.01"}}},
    })


@pytest.mark.parametrize("child_statuses", [("FINISHED", "FINISHED"), ("FINISHED", "FAILED"), ("FAILED", "FAILED")])
def test_sweep_parent_callback(store, experiment, tmp_path, child_statuses, capsys):
    root, uri = store
    sweep_dir = tmp_path / "multirun" / "12-00-00"
    cfg = _sweep_config(uri, experiment, sweep_dir)
    callback = SweepParentCallback(project_root=str(root))
    assert sweep_parent_run_id(sweep_dir) is None
    callback.on_multirun_start(cfg)
    parent_id = callback.run_id
    assert (sweep_dir / PARENT_FILE).read_text().strip() == parent_id == sweep_parent_run_id(sweep_dir)

    children = []
    # each trial's val/top1_sum by step: trial 0 peaks at its first epoch's step, trial 1 at its second; the lr as
    # Hydra writes a trial's override (0.1, 0.01)
    curves = [{6: 50.0, 12: 40.0}, {6: 30.0, 12: 60.0}]
    for index, status in enumerate(child_statuses):
        child = create_tracker(OmegaConf.merge(cfg.tracking, {"parent_run_id": parent_id}), root)
        child.run_name = f"trial-{index}"
        child.start({"optim.lr": 0.1 / 10 ** index}, {"overrides": f"optim.lr={0.1 / 10 ** index}"})
        for step, value in curves[index].items():
            child.log_metrics({"val/top1_sum": value}, step=step)
        child.end(status)
        children.append(child.run_id)
        callback.on_job_end(cfg, JobReturn(status=JobStatus.COMPLETED))
    callback.on_multirun_end(cfg)

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    # FAILED only when no trial finished: a failed trial next to a finished one leaves the sweep's result usable
    assert parent.info.status == ("FINISHED" if "FINISHED" in child_statuses else "FAILED")
    assert re.fullmatch(r"sweep lr \d\d-\d\d \d\d:\d\d:\d\d", parent.info.run_name)
    assert parent.data.params == {"sweep.optim.lr": "0.1,0.01"}
    assert (parent.data.tags["sweeper"], parent.data.tags["sweep.keys"]) == ("basic", "optim.lr")
    assert parent.data.metrics["sweep/trials"] == 2
    assert parent.data.metrics["sweep/failed"] == child_statuses.count("FAILED")
    assert parent.data.tags["overrides"] == "optim.lr=0.1,0.01"
    # the best finished trial: its value at the step its run reached it (in the charts, on the winner's curve) and
    # its lr spelt as in the run names, trials.csv and the printed table
    finished = [i for i, status in enumerate(child_statuses) if status == "FINISHED"]
    if finished:
        winner = max(finished, key=lambda i: max(curves[i].values()))
        value, step = max((v, s) for s, v in curves[winner].items())
        history = client.get_metric_history(parent_id, "best/val/top1_sum")
        assert [(m.step, m.value) for m in history] == [(step, value)]
        assert parent.data.tags["best.optim.lr"] == ("0.1", "0.01")[winner]
        with (sweep_dir / "trials.csv").open() as handle:
            assert next(csv.DictReader(handle))["optim.lr"] == ("0.1", "0.01")[winner]
        assert re.search(rf"^ +- +lr={('0.1', '0.01')[winner]} +{value:.4f} +FINISHED", capsys.readouterr().out,
                         re.M)
    else:
        assert "best/val/top1_sum" not in parent.data.metrics and "best.optim.lr" not in parent.data.tags
    for run_id in children:  # nested, and tagged with their sweep for the UI to group and filter by
        tags = client.get_run(run_id).data.tags
        assert {k: tags[k] for k in ("mlflow.parentRunId", "sweep.parent_id", "sweep.parent", "sweep.name")} == {
            "mlflow.parentRunId": parent_id, "sweep.parent_id": parent_id, "sweep.parent": parent.info.run_name,
            "sweep.name": "sweep lr"}


def test_sweep_parent_fails_when_a_job_failed_before_opening_its_run(store, experiment, tmp_path):
    root, uri = store
    callback = SweepParentCallback(project_root=str(root), run_name="lr-sweep")
    callback.on_multirun_start(_sweep_config(uri, experiment, tmp_path / "sweep"))
    callback.on_job_end(None, JobReturn(status=JobStatus.FAILED))  # only Hydra's job status knows
    callback.on_multirun_end(None)
    parent = MlflowClient(uri).get_run(callback.run_id)
    assert (parent.info.status, parent.info.run_name) == ("FAILED", "lr-sweep")
    assert parent.data.metrics["sweep/failed"] == 1

    disabled = SweepParentCallback(project_root=str(root))
    disabled.on_multirun_start(OmegaConf.create({"tracking": {"enabled": False},
                                                 "hydra": {"sweep": {"dir": str(tmp_path / "off")}}}))
    disabled.on_multirun_end(None)
    assert disabled.run_id is None and sweep_parent_run_id(tmp_path / "off") is None


def test_sweep_parents_of_one_name_are_told_apart(store, experiment, tmp_path, capsys):
    """Two sweeps named alike (started in the same second, or named by hand): the second parent's name gets its
    run id's first 6 characters, before its trials read it; the first keeps its name."""
    root, uri = store
    first, second = (SweepParentCallback(project_root=str(root), run_name="lr 01-31 14:05:09") for _ in range(2))
    first.on_multirun_start(_sweep_config(uri, experiment, tmp_path / "a"))
    second.on_multirun_start(_sweep_config(uri, experiment, tmp_path / "b"))
    child = create_tracker({"uri": uri, "experiment_name": experiment, "parent_run_id": second.run_id}, root)
    child.start({}, {})
    child.end()
    for callback in (first, second):
        callback.on_multirun_end(None)
    client = MlflowClient(uri)
    names = [client.get_run(callback.run_id).info.run_name for callback in (first, second)]
    assert names == ["lr 01-31 14:05:09", f"lr 01-31 14:05:09 {second.run_id[:6]}"]
    assert client.get_run(child.run_id).data.tags["sweep.parent"] == names[1]
    assert f"\n{names[1]}: trials by val/top1_sum" in capsys.readouterr().out  # the summary names it so too


def _python(code: str, cwd: Path, *args: str) -> subprocess.Popen:
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def test_child_run_of_a_vanished_process_is_closed_failed(store, experiment, tmp_path):
    root, uri = store
    callback = SweepParentCallback(project_root=str(root))
    callback.on_multirun_start(_sweep_config(uri, experiment, tmp_path / "sweep"))
    proc = _python(f"""
        import time
        from pathlib import Path
        from conformer.tracking import create_tracker
        tracker = create_tracker({{"uri": {uri!r}, "experiment_name": {experiment!r},
                                  "parent_run_id": {callback.run_id!r}}}, Path.cwd())
        print(tracker.start({{}}, {{}}), flush=True)
        time.sleep(120)
    """, tmp_path)
    try:
        child_id = proc.stdout.readline().strip()
        assert child_id, proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL: no handler, no exit hook, the run stays RUNNING
        proc.communicate(timeout=30)
    client = MlflowClient(uri)
    assert client.get_run(child_id).info.status == "RUNNING"
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == callback.run_id
    callback.on_multirun_end(None)
    assert client.get_run(child_id).info.status == "FAILED"
    assert client.get_run(callback.run_id).info.status == "FAILED"


def test_the_next_start_closes_the_runs_of_killed_processes_on_this_host(store, experiment, tmp_path):
    root, uri = store
    proc = _python(f"""
        import time
        from conformer.tracking import Tracker
        print(Tracker({uri!r}, {experiment!r}).start({{}}, {{}}), flush=True)
        time.sleep(120)
    """, tmp_path)
    try:
        killed_id = proc.stdout.readline().strip()
        assert killed_id, proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL, as the OOM killer sends it: no handler, no exit hook
        proc.communicate(timeout=30)
    client = MlflowClient(uri)
    killed = client.get_run(killed_id)
    assert killed.info.status == "RUNNING"
    assert (killed.data.tags["host"], killed.data.tags["pid"]) == (socket.gethostname(), str(proc.pid))
    experiment_id = killed.info.experiment_id
    elsewhere = client.create_run(experiment_id, tags={"host": "another-host", "pid": str(proc.pid)}).info.run_id
    alive = client.create_run(experiment_id, tags={"host": socket.gethostname(), "pid": str(os.getpid())}).info.run_id

    with Tracker(uri, experiment) as tracker:
        tracker.start({}, {})
    killed = client.get_run(killed_id)
    assert killed.info.status == "FAILED"
    assert killed.data.tags["error"].startswith(f"process {proc.pid} on {socket.gethostname()} ended without")
    assert [client.get_run(run_id).info.status for run_id in (elsewhere, alive)] == ["RUNNING", "RUNNING"]
    for run_id in (elsewhere, alive):
        client.set_terminated(run_id, "FINISHED")


def test_real_hydra_multirun_aborted_by_a_failing_trial(store, experiment, tmp_path):
    # BasicSweeper re-raises a failed trial before on_multirun_end: the exit hook must end the parent.
    root, uri = store
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent(f"""
        fail: false
        tracking: {{enabled: true, uri: "{uri}", experiment_name: {experiment}}}
        hydra:
          callbacks:
            mlflow_sweep: {{_target_: conformer.sweeps.callback.SweepParentCallback, project_root: "{root}"}}
          sweep: {{dir: {tmp_path / "multirun"}}}
    """))
    proc = _python("""
        from pathlib import Path

        import hydra
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
        from conformer.sweeps.callback import sweep_parent_run_id
        from conformer.tracking import create_tracker

        @hydra.main(config_path="conf", config_name="config", version_base="1.3")
        def main(cfg):
            parent = sweep_parent_run_id(HydraConfig.get().sweep.dir)
            tracking = {**OmegaConf.to_container(cfg.tracking), "parent_run_id": parent}
            with create_tracker(tracking, Path.cwd()) as tracker:
                tracker.start({"fail": cfg.fail}, {})
                if cfg.fail:
                    raise RuntimeError("trial diverged")

        main()
    """, tmp_path, "-m", "fail=false,true")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "trial diverged" in err

    client = MlflowClient(uri)
    parent_id = (tmp_path / "multirun" / PARENT_FILE).read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/trials"] == 2
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted((r.data.params["fail"], r.info.status) for r in children) == [
        ("False", "FINISHED"), ("True", "FAILED")]


def test_plot_curves_writes_a_png(tmp_path):
    history = {
        "train/loss": [(s, 2.0 / (s + 1)) for s in range(50)],
        "val/loss": [(10, 1.0), (20, 0.8), (30, 0.7)],
        "lr": [(s, 1e-3 * min(1.0, s / 10)) for s in range(50)],
        "val/top1_conv": [(10, 0.3), (20, 0.5), (30, 0.6)],
        "val/top1_trans": [(10, 0.2), (20, 0.45), (30, 0.55)],
        "val/top1_sum": [(10, 0.35), (20, 0.55), (30, float("nan"))],
    }
    path = plot_curves(history, tmp_path / "plots" / "curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1500, 360)  # 3 groups: loss, lr, top1
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # lines, labels and antialiasing, not a blank canvas
    assert path.stat().st_size > 20_000
    more = plot_curves({**history, "train/samples_per_sec": [(0, 100.0)]}, tmp_path / "more.png")
    with Image.open(more) as image:
        assert image.size == (1500, 720)
    with pytest.raises(ValueError, match="at least one"):
        plot_curves({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="pairs"):
        plot_curves({"loss": [(1, 2.0, 3)]}, tmp_path / "bad.png")


def test_curves_fit_their_figure_without_overlaps() -> None:
    """Each subplot's labels (ticks, offset text, title, x label) lie inside the figure and apart from the others'."""
    steps = range(0, 3000, 25)
    history = {"train/loss": [(s, 7.0 / (s + 1)) for s in steps], "train/lr": [(s, 1e-6 + 1e-5 * s) for s in steps],
               "train/img_per_s": [(s, 12000.0 + s) for s in steps], "train/grad_norm": [(s, 1e-4 * s) for s in steps],
               "val/top1_conv": [(s, 99.5) for s in steps[::10]], "val/top1_sum": [(s, 12.5) for s in steps[::10]],
               "time/epoch_s": [(s, 3600.0 * 24) for s in steps[::10]]}  # 6 groups: 2 rows of 3
    figure = curves_figure(history)
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    boxes = [ax.get_tightbbox(renderer) for ax in figure.axes]
    assert len(boxes) == 6
    for box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), box


def test_git_commit_and_tags(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    expected = head.stdout.strip()
    assert git_commit(REPO) == expected and len(expected) == 40
    assert git_commit(tmp_path) is None
    assert run_tags(world_size=1) == {"overrides": "", "world_size": "1"}


def test_tracking_config_group(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "tracking", conf / "tracking")
    (conf / "config.yaml").write_text("defaults:\n  - tracking: mlflow\n  - _self_\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        on = compose(config_name="config").tracking
        off = compose(config_name="config", overrides=["tracking=disabled"]).tracking
    assert OmegaConf.to_container(on) == {"enabled": True, "uri": None, "experiment_name": "conformer",
                                          "run_name": None, "parent_run_id": None, "log_checkpoints": True,
                                          "system_metrics": False, "fallback_to_local": False}
    assert OmegaConf.to_container(off) == {**OmegaConf.to_container(on), "enabled": False}


@pytest.mark.slow
def test_logging_to_a_real_tracking_server(tmp_path):
    with mlflow_server(tmp_path) as server:
        url = server.url
        with Tracker(url, "server-exp", run_name="http-run") as tracker:
            run_id = tracker.start({"lr": 0.001, "betas": [0.9, 0.999]}, run_tags(model="tiny"))
            for step in range(5):
                tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
            tracker.log_text(json.dumps({"top1": 0.5}), "summary.json")
        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.001", "betas": "[0.9, 0.999]"}
        assert run.data.tags["model"] == "tiny"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]
        assert [a.path for a in client.list_artifacts(run_id)] == ["summary.json"]
        downloaded = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path)))
        assert json.loads(downloaded.read_text()) == {"top1": 0.5}


def test_sweep_trials_are_named_after_their_swept_overrides(tmp_path):
    """A real `python run.py -m` (dry runs: no training): each trial's run name is its swept overrides (sweeper
    params and command-line sweeps, not the fixed ones), each value in its one short spelling however it was typed;
    a single run is task-model-data."""
    (tmp_path / "conf" / "grid").mkdir(parents=True)
    (tmp_path / "conf" / "grid" / "wd.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      optim.optimizer.weight_decay: 5e-2,0.1\n")
    sweep_dir = tmp_path / "sweep"
    result = run_py_to_end(["-m", f"--config-dir={tmp_path / 'conf'}", "+grid=wd", "hardware.dry_run=true",
                            "tracking=disabled", "optim.schedule.base_lr=0.002,5e-4", "model.drop_path_rate=0.1",
                            f"hydra.sweep.dir={sweep_dir}"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = compose_config()
    names = [default_run_name(cfg, sweep_dir / str(job)) for job in range(4)]
    assert sorted(names) == ["base_lr=2e-3 weight_decay=0.05", "base_lr=2e-3 weight_decay=0.1",
                             "base_lr=5e-4 weight_decay=0.05", "base_lr=5e-4 weight_decay=0.1"]
    assert default_run_name(cfg, tmp_path) == "train-conformer_nano-digits"
    assert default_run_name(compose_config(["task=eval", "data=imagenet"]), tmp_path) == "eval-conformer_nano-imagenet"
    assert default_run_name(compose_config(["tracking.run_name=mine"]), sweep_dir / "0") == "mine"


def test_an_existing_experiment_becomes_a_model_training_experiment(store):
    """MLflow 3's UI opens a GenAI experiment on traces: ours are marked model training, also one made elsewhere."""
    root, uri = store
    client = MlflowClient(uri)
    made_elsewhere = client.create_experiment("made-elsewhere")
    with Tracker(uri, "made-elsewhere") as tracker:
        tracker.start()
    assert client.get_experiment(made_elsewhere).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    client.set_experiment_tag(made_elsewhere, EXPERIMENT_KIND_TAG, "genai_development")  # a choice made in the UI
    with Tracker(uri, "made-elsewhere") as tracker:
        tracker.start()
    assert client.get_experiment(made_elsewhere).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_short_requests_override_mlflow_per_thread_without_touching_the_environment() -> None:
    """The quick-retry settings reach MLflow's reads on this thread only, and never the process environment: a
    setenv from a tracking thread can move the C environment under a getenv of MindSpore's (a SIGSEGV seen in an
    msrun worker)."""
    import ctypes
    import threading

    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from conformer.tracking.store import short_requests

    libc_getenv = ctypes.CDLL(None).getenv
    libc_getenv.restype = ctypes.c_char_p
    defaults = (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get())
    seen_elsewhere = []
    with short_requests(3, retries=0):
        with short_requests(None, retries=2):  # nested: the inner retries, the outer timeout
            assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (2, 3)
        assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (0, 3)
        other = threading.Thread(target=lambda: seen_elsewhere.append(
            (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get())))
        other.start()
        other.join()
        for name in (MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, MLFLOW_HTTP_REQUEST_TIMEOUT.name):
            assert name not in os.environ and libc_getenv(name.encode()) is None
    assert seen_elsewhere == [defaults]
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == defaults


def test_checkpoints_in_a_local_store_are_the_run_dirs_files_relinked_at_each_save(store, experiment, tmp_path):
    """A local artifact store: each logged checkpoint is the same file as the run dir's (one copy on disk), a save
    renamed over the name is linked again, a forgotten one (a top-k file pushed out) leaves the artifacts, and with
    log_checkpoints off nothing is stored."""
    root, uri = store
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    last, ranked = checkpoints / "last.ckpt", checkpoints / "epoch001-val_top1_sum-50.0000.ckpt"
    last.write_bytes(b"epoch 1")
    ranked.write_bytes(b"epoch 1")
    with Tracker(uri, experiment) as tracker:
        tracker.start()
        artifacts = Path(tracker.artifact_uri.removeprefix("file://")) / "checkpoints"
        tracker.log_checkpoint(last)
        tracker.log_checkpoint(ranked)
        assert os.path.samefile(artifacts / "last.ckpt", last) and os.path.samefile(artifacts / ranked.name, ranked)
        replacement = last.with_name("next")
        replacement.write_bytes(b"epoch 2")
        replacement.replace(last)  # the next save
        tracker.log_checkpoint(last)
        tracker.forget_checkpoint(ranked.name)
    assert os.path.samefile(artifacts / "last.ckpt", last) and (artifacts / "last.ckpt").read_bytes() == b"epoch 2"
    assert sorted(p.name for p in artifacts.iterdir()) == ["last.ckpt"]
    listed = MlflowClient(uri).list_artifacts(tracker.run_id, "checkpoints")
    assert [a.path for a in listed] == ["checkpoints/last.ckpt"]
    with Tracker(uri, experiment, log_checkpoints=False) as off:
        off.start()
        off.log_checkpoint(last)
    assert MlflowClient(uri).list_artifacts(off.run_id, "checkpoints") == []
