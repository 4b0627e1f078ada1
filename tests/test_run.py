"""Real trainings end to end: `conformer.app.run` and `python run.py`, recorded in real MLflow stores."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from conformer.config.validation import validate_config
from conformer.errors import ConfigError
from conformer.models import create_model
from conformer.models.checkpoint_file import load_weights, read_checkpoint, read_checkpoint_meta, save_checkpoint
from conformer.runtime.signals import check_interrupted, interruptible
from conformer.tracking import comparable_params, local_weights
from conformer.tracking.store import EXPERIMENT_KIND_TAG

from .helpers import (
    compose_config,
    mlflow_server,
    run_py,
    sqlite_uri,
    stop,
    store_uri,
    tiny_folder,
    tiny_overrides,
    train_in_process,
    wait_until,
)

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6  # 96 tiny train images / batch 16


@dataclass(frozen=True)
class Trained:
    cfg: DictConfig
    run_dir: Path
    objective: float
    client: MlflowClient
    run: Run

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run.info.run_id, key)]


def _only_run(client: MlflowClient, experiment: str = "conformer") -> Run:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    cfg, run_dir, objective = train_in_process(root, tiny_folder(tmp_path_factory.getbasetemp()), "trainer.epochs=2",
                                               "trainer.keep_top_k=2", "tags=[smoke,nano]",
                                               "tracking.system_metrics=0.5")
    client = MlflowClient(store_uri(root))
    return Trained(cfg, run_dir, objective, client, _only_run(client))


def test_run_is_finished_with_the_comparable_config_as_params_and_tags(trained: Trained) -> None:
    run_ = trained.run
    assert run_.info.status == "FINISHED"
    assert run_.info.run_name == "train-conformer_nano-folder"
    params = run_.data.params
    # what runs are compared by, plus the whole architecture of the variant (its defaults are not in the config)
    assert comparable_params(trained.cfg, 1).items() <= params.items()
    architecture = {k: v for k, v in params.items() if k not in comparable_params(trained.cfg, 1)}
    assert architecture == {"model.patch_size": "16", "model.in_chans": "3", "model.base_channel": "64",
                            "model.channel_ratio": "1", "model.num_med_block": "0", "model.embed_dim": "96",
                            "model.num_heads": "4", "model.mlp_ratio": "4.0", "model.qkv_bias": "True",
                            "model.qk_scale": "None", "model.drop_rate": "0.0", "model.attn_drop_rate": "0.0"}
    assert params["optim.optimizer.weight_decay"] == "0.05" and params["trainer.keep_top_k"] == "2"
    assert (params["model.embed_dim"], params["model.depth"]) == ("96", "3")
    assert (params["hardware.name"], params["hardware.world_size"], params["seed"]) == ("cpu", "1", "42")
    # no plumbing: no _target_/_partial_, paths, msrun, tracking or other hardware keys
    assert not [k for k in params if "_target_" in k or "_partial_" in k or k.startswith(("paths.", "tracking.",
                                                                                          "hardware.msrun"))]
    assert {k for k in params if k.startswith("hardware.")} == {"hardware.name", "hardware.world_size"}
    assert str(trained.cfg.data.source.root) not in params.values() and len(params) < 107 - 25
    tags = run_.data.tags
    assert {k: tags[k] for k in ("model", "data", "hardware", "task", "run_dir", "world_size", "smoke", "nano")} == {
        "model": "conformer_nano", "data": "folder", "hardware": "cpu", "task": "train",
        "run_dir": str(trained.run_dir), "world_size": "1", "smoke": "true", "nano": "true"}
    # a model-training experiment: MLflow 3's UI files its runs in the runs table, not under GenAI evaluations
    experiment = trained.client.get_experiment(run_.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # the data as dataset inputs (the runs table's Dataset column): one per split, with its image count
    inputs = {i.tags[0].value: i.dataset for i in run_.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    for context, images in (("train", 96), ("validation", 24)):
        dataset = inputs[context]
        assert (dataset.name, json.loads(dataset.source)) == ("folder", {"uri": str(trained.cfg.data.source.root)})
        assert json.loads(dataset.profile) == {"split": context, "num_images": images, "num_classes": 3,
                                               "image_size": 16}
        assert "mlflow_tensorspec" in json.loads(dataset.schema)


def test_metric_histories_follow_the_global_step(trained: Trained) -> None:
    last = 2 * STEPS_PER_EPOCH
    assert [step for step, _ in trained.history("train/loss")] == list(range(2, last + 1, 2))
    assert all(np.isfinite(v) and v > 0 for _, v in trained.history("train/loss"))
    assert [step for step, _ in trained.history("train/lr")] == list(range(2, last + 1, 2))
    assert trained.history("train/epoch") == [(STEPS_PER_EPOCH, 1.0), (last, 2.0)]
    top1 = trained.history("val/top1_sum")
    assert [step for step, _ in top1] == [STEPS_PER_EPOCH, last]
    assert all(0.0 <= v <= 100.0 for _, v in top1)
    for head in ("conv", "trans"):
        assert len(trained.history(f"val/top1_{head}")) == 2
    assert trained.objective == max(v for _, v in top1)
    # the best value so far and its epoch, logged whenever a new best comes
    best = trained.history("best/val/top1_sum")
    assert best[-1][1] == trained.objective and [v for _, v in best] == sorted(v for _, v in best)
    best_epoch = trained.history("best/epoch")[-1][1]
    assert dict(top1)[best_epoch * STEPS_PER_EPOCH] == trained.objective
    # MLflow's system metrics, sampled every 0.5 s (tracking.system_metrics) through the run's outbox
    logged = trained.client.get_run(trained.run.info.run_id).data.metrics
    assert 0 < logged["system/cpu_utilization_percentage"] <= 100 * os.cpu_count()
    assert logged["system/system_memory_usage_megabytes"] > 0
    # every chart in a section; the epoch's mean train loss at the steps of val/loss (one chart holds both)
    assert {key.split("/", 1)[0] for key in logged} == {"train", "val", "time", "system", "best"}
    assert {"train/epoch", "time/epoch_s", "time/compile_train_step_s"} <= set(logged)
    assert [s for s, _ in trained.history("train/loss_epoch")] == [s for s, _ in trained.history("val/loss")] == [
        STEPS_PER_EPOCH, last]
    # no constant series: no loss scaler (trainer.loss_scale=none), no bad image
    assert not [key for key in logged if key == "train/loss_scale" or key.startswith("data/")]


def test_artifacts_are_the_config_log_curves_and_the_checkpoints_stored_once(trained: Trained,
                                                                              tmp_path: Path) -> None:
    client, run_id = trained.client, trained.run.info.run_id
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"config.yaml", "overrides.txt", "train.log", "curves.png", "checkpoints"}
    # the run dir's checkpoints (last, best, the keep_top_k=2 epochs) are the artifacts: the same files on disk
    in_run_dir = sorted(p.name for p in (trained.run_dir / "checkpoints").glob("*.ckpt"))
    assert len(in_run_dir) == 4 and {"best.ckpt", "last.ckpt"} <= set(in_run_dir)
    assert sorted(Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")) == in_run_dir
    artifacts = Path(trained.run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    for name in in_run_dir:
        assert os.path.samefile(artifacts / name, trained.run_dir / "checkpoints" / name), name
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    assert OmegaConf.load(local / "config.yaml") == OmegaConf.to_container(trained.cfg, resolve=True)
    assert (local / "overrides.txt").read_text() == "\n"  # composed in-process: no command line
    log_text = (local / "train.log").read_text()
    assert f"MLflow run {run_id}" in log_text and "epoch 2/2" in log_text and "done: val/top1_sum" in log_text
    assert (local / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_hold_the_training_state(trained: Trained) -> None:
    # the weights keep the network's own names: they load strictly into a freshly built model
    fresh = create_model("conformer_nano", num_classes=3, depth=3, img_size=16)
    assert load_weights(trained.run_dir / "checkpoints" / "best.ckpt", fresh, strict=True)["epoch"] >= 1
    top1 = dict(trained.history("val/top1_sum"))
    tensors, extra = read_checkpoint(trained.run_dir / "checkpoints" / "last.ckpt")
    assert (extra["epoch"], extra["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert extra["metrics"]["val/top1_sum"] == pytest.approx(top1[2 * STEPS_PER_EPOCH])
    assert extra["best_metric"] == trained.objective
    assert (extra["monitor"], extra["mode"]) == ("val/top1_sum", "max")
    assert int(tensors["optimizer.state_step"].asnumpy().reshape(-1)[0]) == 2 * STEPS_PER_EPOCH
    assert any(k.startswith("optimizer.exp_avg") for k in tensors)
    _, best = read_checkpoint(trained.run_dir / "checkpoints" / "best.ckpt")
    assert best["epoch"] == extra["best_epoch"]
    assert best["metrics"]["val/top1_sum"] == trained.objective
    assert best["params"] == trained.run.data.params  # what eval/export runs of these weights record
    # trainer.keep_top_k=2: the two best epochs (of two), each named after and holding its own metric
    ranked = sorted(p for p in (trained.run_dir / "checkpoints").iterdir() if p.name.startswith("epoch"))
    assert [p.name[:8] for p in ranked] == ["epoch001", "epoch002"]
    for path in ranked:
        meta = read_checkpoint_meta(path)
        value = top1[meta["epoch"] * STEPS_PER_EPOCH]
        assert meta["metrics"]["val/top1_sum"] == pytest.approx(value)
        assert path.name == f"epoch{meta['epoch']:03d}-val_top1_sum-{value:.4f}.ckpt"


def test_an_mlflow_run_id_names_its_checkpoints(trained: Trained, tmp_path_factory) -> None:
    run_id, root, tracking = trained.run.info.run_id, Path(trained.cfg.paths.root), trained.cfg.tracking
    checkpoints = trained.run_dir / "checkpoints"
    assert local_weights(f"mlflow:{run_id}", tracking, root) == checkpoints / "best.ckpt"
    assert local_weights(f"mlflow:{run_id}", tracking, root, "last.ckpt") == checkpoints / "last.ckpt"
    hidden = checkpoints.with_name("moved-away")  # a run dir that is gone: the artifact, the same file
    artifacts = Path(trained.run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    checkpoints.rename(hidden)
    try:
        assert local_weights(f"mlflow:{run_id}", tracking, root, "last.ckpt") == artifacts / "last.ckpt"
        artifacts.rename(artifacts.with_name("gone"))  # and neither: a clear error
        try:
            with pytest.raises(LookupError, match=f"no checkpoints/best.ckpt: not in its run dir {checkpoints} .* "
                                                  r"nor among its artifacts \(stored there unless tracking.log_chec"):
                local_weights(f"mlflow:{run_id}", tracking, root)
        finally:
            artifacts.with_name("gone").rename(artifacts)
    finally:
        hidden.rename(checkpoints)

    # task=eval on the run's best weights, by run id, through the app
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    _, eval_dir, objective = train_in_process(root, data_root, "task=eval", f"task.checkpoint=mlflow:{run_id}",
                                              run_name="eval-by-run-id")
    assert objective == pytest.approx(trained.objective, abs=1e-9)  # best.ckpt on the same val images
    eval_run = next(r for r in trained.client.search_runs([trained.run.info.experiment_id])
                    if r.data.tags.get("task") == "eval")
    assert eval_run.data.tags["weights"] == str(checkpoints / "best.ckpt") and eval_run.info.status == "FINISHED"
    # linked to its training run, with the config the weights were trained with (not this eval's defaults)
    assert eval_run.data.tags["trained_by_run_id"] == run_id
    link = f"[train-conformer_nano-folder](#/experiments/{trained.run.info.experiment_id}/runs/{run_id})"
    assert eval_run.data.tags["mlflow.note.content"].startswith(f"Weights of the training run {link} (best ")
    assert eval_run.info.run_name == "eval-conformer_nano-folder"
    assert eval_run.data.params == {**trained.run.data.params, "task.checkpoint": f"mlflow:{run_id}",
                                    "task.ema": "False"}
    [dataset] = eval_run.inputs.dataset_inputs
    assert (dataset.tags[0].value, json.loads(dataset.dataset.profile)["num_images"]) == ("validation", 24)
    for spec, message in ((f"mlflow:{'0' * 32}", f"no MLflow run {'0' * 32}"), ("mlflow:", "give the run id")):
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_config(tiny_overrides(root, data_root, f"tracking.uri={store_uri(root)}",
                                                          "task=eval", f"task.checkpoint={spec}")))


def test_diverging_run_ends_failed(trained: Trained, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("diverging")
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1"):
        train_in_process(root, data_root, "trainer.epochs=2", "optim.schedule.base_lr=1e30",
                         "optim.schedule.warmup_epochs=0")
    client = MlflowClient(store_uri(root))
    failed = _only_run(client)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith("FloatingPointError: loss is nan")
    assert "train.log" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert not (root / "outputs" / "run" / "checkpoints").exists()
    # each run's log holds only its own records (in-process runs must not leak into each other's train.log)
    assert failed.info.run_id not in (trained.run_dir / "train.log").read_text()


HUGE_SCALE = 1e38


def test_overflow_steps_are_skipped_and_kept_out_of_the_averages(tmp_path_factory) -> None:
    """On MindSpore's ops (the device path: its LayerNorm backward sums in float32 and overflows at HUGE_SCALE, where
    our kernel sums in double and does not), a dynamic loss scale far too high: the first updates overflow, are
    skipped, the scale comes down, the run finishes; the logged loss and gradient norm average only the steps that
    counted. The run fine-tunes a 10-class
    checkpoint on the 3-class data (everything but the classifier heads is loaded), and one of its train images is
    a corrupt file: skipped, named in the log, counted in MLflow."""
    root = tmp_path_factory.mktemp("overflow")
    data_root = root / "data"
    shutil.copytree(tiny_folder(tmp_path_factory.getbasetemp()), data_root)
    corrupt = data_root / "train" / "class_01" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    pretrained = save_checkpoint(create_model("conformer_nano", num_classes=10, depth=3, img_size=16),
                                 root / "ten-classes.ckpt")
    _, run_dir, objective = train_in_process(root, data_root, "trainer.epochs=1", "optim.schedule.warmup_epochs=0",
                                             "trainer.loss_scale=dynamic", f"trainer.init_loss_scale={HUGE_SCALE}",
                                             "hardware.kernels=mindspore",
                                             "trainer.log_every_n_steps=1", f"model.pretrained={pretrained}")
    client = MlflowClient(store_uri(root))
    run = _only_run(client)
    assert run.info.status == "FINISHED" and objective is not None
    log_text = (run_dir / "train.log").read_text()
    assert f"fine-tuning: {pretrained} has 10 classes, the model 3" in log_text
    assert log_text.count(f"skipping bad image {corrupt}") == 1
    assert [m.value for m in client.get_metric_history(run.info.run_id, "data/skipped_images_train")] == [1.0]
    assert "data/skipped_images_val" not in run.data.metrics  # no bad val image: no chart of zeros
    scales = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss_scale")]
    assert scales[0] < HUGE_SCALE and scales == sorted(scales, reverse=True)  # halved on every overflow
    norms = client.get_metric_history(run.info.run_id, "train/grad_norm")
    assert norms and all(np.isfinite(m.value) for m in norms)
    overflows = round(math.log2(HUGE_SCALE / scales[-1]))  # each one halved the scale
    assert overflows >= 1 and len(scales) == 6 - overflows  # 6 steps; only the applied ones are logged


def test_a_ctrl_c_swallowed_by_a_finalizer_is_not_lost() -> None:
    """Python drops exceptions raised in __del__ or weakref callbacks: `check_interrupted` raises it again."""
    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs here; its KeyboardInterrupt is "ignored"

    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN in a pytest-xdist worker
    with interruptible():
        Finalized()  # collected at once
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    check_interrupted()  # the memory of it ends with the run
    assert signal.getsignal(signal.SIGINT) is before


def test_a_swallowed_ctrl_c_stays_quiet_after_the_unraisable_hook_was_reset(capfd: pytest.CaptureFixture) -> None:
    """MindSpore's first epoch sets `sys.unraisablehook` back to Python's (from C); a Ctrl-C then landing in a
    callback Python drops (an at-fork callback of the next epoch's data workers) printed "Exception ignored in" and a
    traceback. Every training step's `check_interrupted` takes the quiet hook back."""
    class Thing:
        pass

    with interruptible():
        sys.unraisablehook = sys.__unraisablehook__  # what MindSpore does
        check_interrupted()
        thing = Thing()
        dropped = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))  # a callback, not a __del__
        del thing  # the callback runs here; its Interrupted is "ignored"
        assert dropped() is None
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    check_interrupted()
    assert "Exception ignored" not in capfd.readouterr().err


def test_ctrl_c_during_compilation_ends_the_run_killed(tmp_path: Path, tmp_path_factory) -> None:
    """A Ctrl-C while MindSpore compiles (C++, ~15 s) ends the run KILLED with exit 130 (the watchdog does not wait
    for the compile; how fast is benchmarks' business, not a test's on a busy machine)."""
    data_root = tiny_folder(tmp_path_factory.getbasetemp())
    proc = run_py(tiny_overrides(tmp_path, data_root, "trainer.epochs=2"), tmp_path)
    try:
        # MindSpore compiles the train step in C++ for ~15 s: Python's own handler would wait for it to end
        wait_until(lambda: any("compiling the train step" in log.read_text() for log in
                               tmp_path.glob("outputs/*/*/train.log")), proc, "the train step compiling")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert re.match(r"interrupted \((received )?SIGINT", err.strip().splitlines()[-1]), err[-3000:]
    assert "Traceback" not in err
    killed = _only_run(MlflowClient(sqlite_uri(tmp_path / "mlflow.db")))
    assert killed.info.status == "KILLED"


def test_cli_trains_digits_into_one_run_dir_and_a_tracking_server(tmp_path: Path, tmp_path_factory) -> None:
    """`python run.py` with the default data (digits), logging to a real `mlflow server` on 127.0.0.1 that is killed
    while the train step compiles and comes back later: the training goes on, and everything it logged arrives."""
    digits = tmp_path_factory.getbasetemp() / "digits"  # one materialised copy for the whole session
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as server:
        url = server.url
        args = [f"data.source.root={digits}", "data.image_size=16", "+model.depth=3", "trainer.epochs=1",
                f"tracking.uri={url}", "tracking.experiment_name=cli", "tags={owner:ci,ticket:8}"]
        proc = run_py(args, tmp_path)
        try:
            wait_until(lambda: any("compiling the train step" in log.read_text() for log in
                                   tmp_path.glob("outputs/*/*/train.log")), proc, "the train step compiling")
            server.kill()
            server.start()  # same port, same store: the run is there again
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        client = MlflowClient(url)
        run_ = _only_run(client, "cli")
        run_id = run_.info.run_id
        assert run_.info.status == "FINISHED"
        [top1] = client.get_metric_history(run_id, "val/top1_sum")
        assert top1.step == 1437 // 64  # digits: 1,437 train images, batches of 64
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert artifacts == {"config.yaml", "overrides.txt", "train.log", "curves.png", "checkpoints"}
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.ckpt",
                                                                                  "checkpoints/last.ckpt"}
        assert (run_.info.run_name, run_.data.tags["owner"], run_.data.tags["ticket"]) == (
            "train-conformer_nano-digits", "ci", "8")  # tags= from the command line
        overrides = Path(client.download_artifacts(run_id, "overrides.txt", str(tmp_path))).read_text()
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20, 22]  # none lost
    final = re.search(r"done: val/top1_sum (\d+\.\d+) \(best (\d+\.\d+) at epoch 1\)", out)
    assert final, out[-2000:]
    assert float(final.group(1)) == pytest.approx(top1.value, abs=0.005)
    run_dirs = [p for p in (tmp_path / "outputs").rglob("*") if (p / ".hydra").is_dir()]
    assert len(run_dirs) == 1
    assert run_.data.tags["run_dir"] == str(run_dirs[0])
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file() and (run_dirs[0] / "train.log").is_file()
    assert overrides.split() == args
    assert (digits / "train" / "9").is_dir()
