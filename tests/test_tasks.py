"""task=eval / export / predict: real runs of conformer_nano on digits, the reference weights and files we write."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mindspore import nn
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from PIL import Image

from conformer import kernels
from conformer.app import run
from conformer.data.generated import DigitsSource
from conformer.data.transforms import EvalTransform
from conformer.errors import ConfigError
from conformer.models import create_model
from conformer.models.checkpoint_file import load_weights, save_checkpoint
from conformer.models.convert import load_official_weights
from conformer.tasks.common import build_data
from conformer.tasks.export import ExportNetwork, make_onnx_compatible
from conformer.tasks.predict import class_names
from conformer.tracking import default_tracking_uri
from conformer.train.checkpoint import CheckpointManager
from conformer.train.ema import ModelEma

from .parity import EVAL_LOGITS_TOL, REFERENCE, max_rel_error, reference_model
from .test_data_sources import write_corrupt_jpeg, write_truncated

REPO = Path(__file__).resolve().parents[1]
TINY_STATE = REFERENCE / "tiny_state.npz"
SIZE = 32
HEADS = ("conv", "trans", "sum")


# ---------------------------------------------------------------------------------------------------- helpers
def compose_cfg(root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", f"data.image_size={SIZE}", *overrides])


def run_task(root: Path, task: str, *overrides: str) -> tuple[float | None, Path]:
    run_dir = root / "runs" / f"{task}-{uuid.uuid4().hex[:8]}"
    return run(compose_cfg(root, f"task={task}", *overrides), run_dir), run_dir


def nano(size: int = SIZE) -> nn.Cell:
    return create_model("conformer_nano", num_classes=10, img_size=size)


def mlflow_run(root: Path, run_dir: Path):
    client = MlflowClient(tracking_uri=default_tracking_uri(root))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.run_dir = '{run_dir}'")
    assert len(runs) == 1
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def unexportable_cells(network: nn.Cell) -> int:
    """Exact GELUs (MindSpore 2.10 has no ONNX Erf) and padded max-pools: the cells it cannot write to ONNX."""
    return sum((isinstance(c, nn.GELU) and c.approximate == "none") or
               (isinstance(c, nn.MaxPool2d) and c.pad_mode == "PAD") for _, c in network.cells_and_names())


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def reference_probabilities(checkpoint: Path, paths: list[str | Path]) -> np.ndarray:
    """softmax(conv + trans) of image files under the digits eval preprocessing, computed here, not by the task."""
    network = nano()
    load_weights(checkpoint, network)
    network.set_train(False)
    ops = EvalTransform(SIZE, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3).operations(decode=False)
    batch = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        for op in ops:
            image = op(image)
        batch.append(image)
    conv, trans = (t.asnumpy().astype(np.float64) for t in network(ms.Tensor(np.stack(batch))))
    return softmax(conv + trans)


def protobuf_fields(data: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message (wire format); fails on anything that is not one."""
    fields: dict[int, list] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            length = varint()
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire} at byte {pos}: not a protobuf message")
        assert number > 0
        fields.setdefault(number, []).append(value)
    assert pos == len(data), "truncated protobuf"
    return fields


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Project root of these runs: mlflow.db, the digits cache, run dirs."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def checkpoint(root: Path) -> Path:
    """Our checkpoint format with freshly initialised weights (no training needed)."""
    ms.set_seed(0)
    return save_checkpoint(nano(), root / "weights" / "nano.ckpt", extra={"epoch": 0})


@pytest.fixture(scope="module")
def official_eval(root: Path) -> tuple[float, Path, dict]:
    """task=eval of the official reference weights (converted on load)."""
    objective, run_dir = run_task(root, "eval", f"task.checkpoint={TINY_STATE}")
    return objective, run_dir, json.loads((run_dir / "eval_metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------- eval
def test_eval_of_official_weights_matches_a_manual_computation(root: Path, official_eval) -> None:
    objective, run_dir, report = official_eval
    metrics = report["metrics"]
    assert objective == metrics["val/top1_sum"]
    assert report["weights"] == str(TINY_STATE.resolve()) and report["ema"] is False and report["images"] == 360
    for head in HEADS:
        assert 0.0 <= metrics[f"val/top1_{head}"] <= metrics[f"val/top5_{head}"] <= 100.0

    # the same val images through the reference network, scored in numpy
    data = build_data(compose_cfg(root))
    network = nano()
    load_official_weights(network, TINY_STATE)
    network.set_train(False)
    logits = {head: [] for head in HEADS}
    labels = []
    for images, batch_labels in data.val_loader().create_tuple_iterator(num_epochs=1):
        conv, trans = (t.asnumpy().astype(np.float64) for t in network(images))
        logits["conv"].append(conv)
        logits["trans"].append(trans)
        logits["sum"].append(conv + trans)
        labels.append(batch_labels.asnumpy())
    y = np.concatenate(labels)
    assert len(y) == 360
    for head in HEADS:
        scores = np.concatenate(logits[head])
        ranks = (scores > scores[np.arange(len(y)), y][:, None]).sum(axis=1)  # classes scored above the label
        assert metrics[f"val/top1_{head}"] == pytest.approx(100.0 * np.mean(ranks == 0), abs=1e-9)
        assert metrics[f"val/top5_{head}"] == pytest.approx(100.0 * np.mean(ranks < 5), abs=1e-9)
    nll = {h: -np.log(softmax(np.concatenate(logits[h]))[np.arange(len(y)), y]) for h in ("conv", "trans")}
    assert metrics["val/loss"] == pytest.approx(np.mean(0.5 * nll["conv"] + 0.5 * nll["trans"]), rel=1e-5)

    client, mlrun = mlflow_run(root, run_dir)
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["task"] == "eval"
    assert mlrun.data.metrics["val/top1_sum"] == pytest.approx(metrics["val/top1_sum"])
    assert set(mlrun.data.metrics) == {*metrics, "time/eval_s"}  # every chart in a section
    assert {"eval_metrics.json", "config.yaml"} <= artifact_paths(client, mlrun.info.run_id)


def test_eval_of_ema_weights_uses_the_ema_copy(root: Path, official_eval) -> None:
    # live weights: a fresh init; EMA copy: the reference weights. task.ema=true must score the reference.
    ms.set_seed(1)
    live = nano()
    manager = CheckpointManager(root / "ema_run")
    manager.save(live, None, ModelEma(reference_model(), decay=0.5), epoch=1, step=1, metrics={"val/top1_sum": 0.0})
    objective, run_dir = run_task(root, "eval", f"task.checkpoint={manager.last_path}", "task.ema=true")
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())["metrics"]
    expected = official_eval[2]["metrics"]
    assert objective == expected["val/top1_sum"]
    assert metrics == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- export
def test_export_mindir_round_trip_gives_the_reference_logits(root: Path) -> None:
    io = np.load(REFERENCE / "tiny_io.npz")
    _, run_dir = run_task(root, "export", f"task.checkpoint={TINY_STATE}", "data.image_size=64",
                          "task.batch_size=2", "task.output=both")
    path = run_dir / "conformer_nano.mindir"
    assert path.is_file()
    conv, trans = (t.asnumpy() for t in nn.GraphCell(ms.load(str(path)))(ms.Tensor(io["x"])))
    assert max_rel_error(conv, io["conv_logits"]) < EVAL_LOGITS_TOL
    assert max_rel_error(trans, io["trans_logits"]) < EVAL_LOGITS_TOL
    live_conv, live_trans = (t.asnumpy() for t in reference_model()(ms.Tensor(io["x"])))
    np.testing.assert_allclose(conv, live_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trans, live_trans, rtol=1e-5, atol=1e-5)

    client, mlrun = mlflow_run(root, run_dir)
    assert mlrun.data.tags["task"] == "export" and mlrun.data.tags["format"] == "MINDIR"
    assert "export/conformer_nano.mindir" in artifact_paths(client, mlrun.info.run_id)


def test_export_onnx_writes_a_one_output_model(root: Path, checkpoint: Path, tmp_path: Path) -> None:
    run_task(root, "export", f"task.checkpoint={checkpoint}", "task.format=onnx", f"task.file={tmp_path}/deploy/m")
    data = (tmp_path / "deploy" / "m.onnx").read_bytes()
    model = protobuf_fields(data)  # ModelProto: 1 ir_version, 2 producer_name, 7 graph
    assert model[1][0] >= 3 and model[2] == [b"MindSpore"]
    graph = protobuf_fields(model[7][0])  # GraphProto: 5 initializer, 11 input, 12 output
    assert len(graph[11]) == 1 and len(graph[12]) == 1  # images in, summed logits out
    assert len(graph[5]) >= len(nano().trainable_params())
    assert len(data) > 4 * 1_292_964  # the float32 weights are inside


def test_onnx_compatible_cells_compute_the_same_logits() -> None:
    ms.set_seed(2)
    with kernels.using("mindspore"):  # what export builds: MindSpore's cells, the stem pool a pad + valid pool
        network = nano()
    network.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    before = ExportNetwork(network, "sum")(x).asnumpy()
    assert not any(isinstance(c, nn.MaxPool2d) and c.pad_mode == "PAD" for _, c in network.cells_and_names())
    unexportable = unexportable_cells(network)
    assert unexportable >= 7  # the exact GELU of every transformer MLP and FCUDown
    assert make_onnx_compatible(network) == unexportable
    assert unexportable_cells(network) == 0
    after = ExportNetwork(network, "sum")(x).asnumpy()  # a new top cell: compiled with the swapped cells
    assert max_rel_error(after, before) < 1e-5


# ---------------------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def images(root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five digits PNGs (grey 8x8) and one non-square RGB JPEG, in a folder tree."""
    digits = DigitsSource(root / ".cache" / "digits")
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for source, _ in digits.val_samples[::72][:5]:
        target = folder / "digits" / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(source).read_bytes())
        paths.append(target)
    photo = folder / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(photo)
    return sorted(paths) + [photo]


def test_predict_cli_writes_the_top_k_of_the_summed_logits(root: Path, checkpoint: Path, images: list[Path]) -> None:
    env = {**os.environ, "CONFORMER_PROJECT_ROOT": str(root)}
    result = subprocess.run(
        [sys.executable, "run.py", "task=predict", f"task.checkpoint={checkpoint}",
         f"task.inputs={images[0].parents[1]}", "task.topk=3", "task.batch_size=4", f"data.image_size={SIZE}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (csv_path,) = (root / "outputs").rglob("predictions.csv")
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["path"]) for row in rows] == sorted(images)
    for row in rows:
        probs = [float(row[f"prob_{i}"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0.0 < sum(probs) <= 1.0 + 1e-9
        assert {row[f"label_{i}"] for i in (1, 2, 3)} <= {str(d) for d in range(10)}
        assert f"{row['path']}: {row['label_1']} " in result.stdout

    # the same files, preprocessed and scored here
    expected = reference_probabilities(checkpoint, [row["path"] for row in rows])
    for row, probs in zip(rows, expected):
        top = np.argsort(-probs)[:3]
        assert [row[f"label_{i}"] for i in (1, 2, 3)] == [str(c) for c in top]
        np.testing.assert_allclose([float(row[f"prob_{i}"]) for i in (1, 2, 3)], probs[top], rtol=1e-4)


def test_predict_survives_any_file_name_and_escapes_it_in_what_it_writes(root: Path, checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    """A name that is not UTF-8 and one with a newline (which would forge an output line): both predicted, printed
    and written to the CSV escaped, one line each."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    names = [b"good.png", b"odd-\xff\xfe.png", b"two\nforged: 9 100.0%.png"]
    for index, name in enumerate(names):
        Image.new("L", (8, 8), 60 * index).save(os.fsdecode(os.fsencode(folder) + b"/" + name), format="PNG")
    env = {**os.environ, "CONFORMER_PROJECT_ROOT": str(root), "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "run.py", "task=predict", f"task.checkpoint={checkpoint}", f"task.inputs={folder}",
         "task.topk=1", f"data.image_size={SIZE}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.decode().splitlines()
    shown = [f"{folder}/good.png", f"{folder}/odd-\\xff\\xfe.png", f"{folder}/two\\nforged: 9 100.0%.png"]
    assert [line.rsplit(": ", 1)[0] for line in out if line.startswith(str(folder))] == shown
    assert not any(line.startswith("forged") for line in out)
    with (tmp_path / "run" / "predictions.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == shown and all(row["label_1"] and not row["error"] for row in rows)


def test_class_names_come_from_a_file_the_data_source_or_nowhere(root: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\nbird\n")
    assert class_names(compose_cfg(root, "task=predict", f"task.classes={names}")) == ["cat", "dog", "bird"]
    assert class_names(compose_cfg(root, "task=predict")) == [str(d) for d in range(10)]  # digits folders
    assert class_names(compose_cfg(root, "task=predict", "data=folder")) is None  # no data.source.root
    with pytest.raises(ConfigError, match="no such file"):
        class_names(compose_cfg(root, "task=predict", f"task.classes={tmp_path}/missing.txt"))


def test_predict_skips_bad_files_and_lists_them_with_the_reason(root: Path, checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(photo)
    Image.new("L", (8, 8), 200).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_corrupt_jpeg(tmp_path / "corrupt.jpg")
    write_truncated(tmp_path / "truncated.jpg", photo)
    _, run_dir = run_task(root, "predict", f"task.checkpoint={checkpoint}", f"task.inputs={tmp_path}", "task.topk=3")

    with (run_dir / "predictions.csv").open() as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert list(rows) == ["broken.png", "corrupt.jpg", "good.png", "photo.jpg", "truncated.jpg"]  # input order
    reasons = {"broken.png": "not an image", "corrupt.jpg": "not an image", "truncated.jpg": "truncated"}
    out = capsys.readouterr().out
    for name, reason in reasons.items():
        row = rows[name]
        assert reason in row["error"].lower()
        assert {row[f"{kind}_{i}"] for kind in ("label", "prob") for i in (1, 2, 3)} == {""}
        assert f"{row['path']}: skipped ({row['error']})" in out
    for name, probs in zip(("good.png", "photo.jpg"), reference_probabilities(checkpoint, [tmp_path / "good.png",
                                                                                           photo])):
        row, top = rows[name], np.argsort(-probs)[:3]
        assert row["error"] == "" and [row[f"label_{i}"] for i in (1, 2, 3)] == [str(c) for c in top]
        np.testing.assert_allclose([float(row[f"prob_{i}"]) for i in (1, 2, 3)], probs[top], rtol=1e-4)
        assert f"{row['path']}: {row['label_1']} " in out

    _, mlrun = mlflow_run(root, run_dir)
    assert mlrun.info.status == "FINISHED"
    assert (mlrun.data.tags["images"], mlrun.data.tags["skipped_images"]) == ("2", "3")
    [dataset] = mlrun.inputs.dataset_inputs  # the Dataset column of the runs table: what was predicted
    assert (dataset.tags[0].value, dataset.dataset.name, json.loads(dataset.dataset.source)["uri"]) == (
        "inference", "predict inputs", str(tmp_path))
    assert json.loads(dataset.dataset.profile)["num_images"] == 2


# ---------------------------------------------------------------------------------------------------- errors
@pytest.fixture()
def broken_png(tmp_path: Path) -> Path:
    Image.new("L", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    return tmp_path


@pytest.mark.parametrize(("task", "overrides", "error", "message"), [
    ("eval", [], ConfigError, "needs weights: set task.checkpoint"),
    ("eval", ["task.checkpoint=/no/such/best.ckpt"], ConfigError, "no such file"),
    ("eval", [f"task.checkpoint={TINY_STATE}", "task.ema=true"], ConfigError, "holds no EMA copy"),
    ("export", [f"task.checkpoint={TINY_STATE}", "task.format=AIR"], ConfigError, "needs an Ascend device"),
    ("export", [f"task.checkpoint={TINY_STATE}", "task.output=mean"], ConfigError, "choose sum"),
    ("export", [f"task.checkpoint={TINY_STATE}", "task.register=conformer-digits"], ConfigError,
     "tracking is disabled"),
    ("export", [f"task.checkpoint={TINY_STATE}", "task.register=team/digits"], ConfigError, "must not contain '/'"),
    ("export", [f"task.checkpoint={TINY_STATE}", "task.log_model=true", "task.format=ONNX"], ConfigError,
     "set task.format=MINDIR"),
    ("predict", [f"task.checkpoint={TINY_STATE}"], ConfigError, "task.inputs is required"),
    ("predict", [f"task.checkpoint={TINY_STATE}", "task.inputs={tmp}/*.jpg"], ConfigError, "matches no image"),
    ("predict", [f"task.checkpoint={TINY_STATE}", "task.inputs={tmp}/broken.png"], ValueError,
     "none of the 1 input images can be read"),
    ("predict", [f"task.checkpoint={TINY_STATE}", "task.inputs={tmp}", "task.topk=0"], ConfigError,
     "task.topk=0 must be an integer >= 1"),
    ("eval", [f"model.pretrained={TINY_STATE}"], ConfigError, "model.pretrained is where a training starts"),
    ("predict", [f"task.checkpoint={TINY_STATE}", "task.inputs={tmp}/good.png", "task.classes={tmp}/names.txt"],
     ConfigError, "the weights have 10 classes but 3 class names"),
])
def test_bad_task_settings_fail_early_with_a_clear_message(root: Path, broken_png: Path, task: str,
                                                           overrides: list[str], error: type, message: str) -> None:
    overrides = [o.replace("{tmp}", str(broken_png)) for o in overrides]
    with pytest.raises(error, match=message) as caught:
        run_task(root, task, "tracking.enabled=false", *overrides)
    if "can be read" in message:
        assert "broken.png" in str(caught.value) and "good.png" not in str(caught.value)
