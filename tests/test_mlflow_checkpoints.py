"""A training's checkpoints in a real `mlflow server` on 127.0.0.1: uploaded in the background (through an outage),
and `mlflow:<run_id>` weights found from a project root that never saw the run dir."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conformer.config.validation import validate_config
from conformer.models.checkpoint_file import read_checkpoint_meta
from conformer.tracking import Tracker, local_weights

from .helpers import compose_config, mlflow_server, tiny_folder, tiny_overrides

pytestmark = pytest.mark.slow


def run_in(root: Path, data_root: Path, url: str, run_name: str, *extra: str) -> float | None:
    """`conformer.app.run` of a tiny config with everything under `root`, tracked to the server `url`."""
    from conformer.app import run

    cfg = compose_config(tiny_overrides(root, data_root, f"tracking.uri={url}", *extra))
    return run(cfg, root / "outputs" / run_name)


def test_checkpoints_reach_the_server_through_an_outage_newest_save_first(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    with mlflow_server(tmp_path / "server", proxy_artifacts=True) as server:
        tracker = Tracker(server.url, "outage", retry_interval=0.5)
        with tracker:
            tracker.start()
            server.kill()
            checkpoint.write_bytes(b"epoch 1")
            tracker.log_checkpoint(checkpoint)  # queued: the store is down
            replacement = checkpoint.with_name("new")
            replacement.write_bytes(b"epoch 2")
            replacement.replace(checkpoint)  # the next save, renamed over the name
            tracker.log_checkpoint(checkpoint)
            server.start()
        client = MlflowClient(server.url)
        run_id = tracker.run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        [artifact] = client.list_artifacts(run_id, "checkpoints")
        local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "down"))
        assert (artifact.path, Path(local).read_bytes()) == ("checkpoints/last.ckpt", b"epoch 2")


def test_mlflow_run_weights_from_a_fresh_project_root(tmp_path: Path, tmp_path_factory) -> None:
    """Train against the server, delete the run dir, then eval, resume and fine-tune by run id from another root."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    trainer_root, fresh = tmp_path / "trainer-machine", tmp_path / "another-machine"
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server", proxy_artifacts=True) as server:
        objective = run_in(trainer_root, data_root, server.url, "train", "trainer.epochs=1",
                           "optim.schedule.warmup_epochs=0")
        client = MlflowClient(server.url)
        [trained] = client.search_runs([client.get_experiment_by_name("conformer").experiment_id])
        run_id = trained.info.run_id
        assert trained.info.artifact_uri.startswith("mlflow-artifacts:")  # only HTTP reaches them
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.ckpt",
                                                                                  "checkpoints/last.ckpt"}
        shutil.rmtree(trainer_root)  # nothing of the training is left on this machine but the server

        # task.checkpoint=mlflow:<id>: the best weights, downloaded, evaluate to the training's best value
        evaluated = run_in(fresh, data_root, server.url, "eval", "task=eval", f"task.checkpoint=mlflow:{run_id}")
        assert evaluated == pytest.approx(objective, abs=1e-9)
        # model.pretrained=mlflow:<id>: checked and found the same way
        cfg = compose_config(tiny_overrides(fresh, data_root, f"tracking.uri={server.url}",
                                            f"model.pretrained=mlflow:{run_id}"))
        validate_config(cfg)
        best = local_weights(f"mlflow:{run_id}", cfg.tracking, fresh)
        assert best.is_relative_to(fresh) and read_checkpoint_meta(best)["mlflow_run_id"] == run_id
        # trainer.resume=mlflow:<id>: its last.ckpt (and best.ckpt) continue the same MLflow run to epoch 2
        run_in(fresh, data_root, server.url, "resumed", "trainer.epochs=2", "optim.schedule.warmup_epochs=0",
               f"trainer.resume=mlflow:{run_id}")
        resumed = client.get_run(run_id)
        assert resumed.info.status == "FINISHED" and resumed.data.tags["run_dir"] == str(fresh / "outputs/resumed")
        last = client.download_artifacts(run_id, "checkpoints/last.ckpt", str(tmp_path / "down"))
        assert read_checkpoint_meta(last)["epoch"] == 2
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.ckpt",
                                                                                  "checkpoints/last.ckpt"}
