"""task=export task.register: a registered MLflow pyfunc model that a real `mlflow models serve` on 127.0.0.1
answers with task=predict's probabilities (the untrained nano checkpoint of test_tasks: no training here)."""
# ruff: noqa: F811  (the module fixtures of test_tasks, imported, are parameters here)
from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mindspore as ms
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from conformer.models.checkpoint_file import read_checkpoint, save_checkpoint
from conformer.runtime.launch import free_port
from conformer.serving.pyfunc_model import MAX_PIXELS_ENV
from conformer.tracking import default_tracking_uri

from .helpers import stop, wait_until
from .test_tasks import checkpoint, images, mlflow_run, root, run_task  # noqa: F401  (module fixtures)

NAME = "conformer-digits"
BUDGET = 5000  # decoded pixels per request the server allows: the six test images hold 1,280
CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def training_run(root: Path) -> tuple[str, str]:
    """(experiment id, run id) of a training run in the project's store, as a training leaves it for its weights."""
    client = MlflowClient(default_tracking_uri(root))
    experiment = client.get_experiment_by_name("conformer")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("conformer")
    run = client.create_run(experiment_id, run_name="train-conformer_nano-digits")
    client.log_metric(run.info.run_id, "best/val/top1_sum", 91.5)
    client.set_terminated(run.info.run_id)
    return experiment_id, run.info.run_id


@pytest.fixture(scope="module")
def trained_checkpoint(root: Path, checkpoint: Path, training_run: tuple[str, str]) -> Path:
    """The same weights, with the meta a training writes: its MLflow run and best value."""
    tensors, _ = read_checkpoint(checkpoint)
    meta = {"epoch": 3, "mlflow_run_id": training_run[1], "monitor": "val/top1_sum", "best_metric": 91.5}
    return save_checkpoint(tensors, root / "weights" / "nano-trained.ckpt", extra=meta)


@pytest.fixture(scope="module")
def exported(root: Path, trained_checkpoint: Path) -> Path:
    """The export run that logged and registered the model (batch 4: six images need a padded batch); what it
    printed is kept as `<run dir>/printed.txt` (the server below runs the command it prints)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _, run_dir = run_task(root, "export", f"task.checkpoint={trained_checkpoint}", f"task.register={NAME}",
                              "task.batch_size=4")
    (run_dir / "printed.txt").write_text(printed.getvalue())
    return run_dir


@pytest.fixture(scope="module")
def predicted(root: Path, checkpoint: Path, images: list[Path]) -> dict[Path, np.ndarray]:
    """task=predict's probabilities of every class, per image, read from its predictions.csv."""
    _, run_dir = run_task(root, "predict", f"task.checkpoint={checkpoint}", f"task.inputs={images[0].parents[1]}",
                          "task.topk=10", "task.batch_size=4")
    with (run_dir / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(images)
    return {Path(row["path"]): np.array([float(row[f"prob_{i}"]) for i in range(1, 11)])[
        np.argsort([int(row[f"label_{i}"]) for i in range(1, 11)])] for row in rows}


@pytest.fixture(scope="module")
def server(root: Path, exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The command the export printed, `MLFLOW_TRACKING_URI=<the store> mlflow models serve -m models:/<NAME>/1
    --env-manager local`, on 127.0.0.1, from another directory."""
    hint = re.search(r"serve it with: MLFLOW_TRACKING_URI=(\S+) mlflow models serve -m (\S+) --env-manager local$",
                     (exported / "printed.txt").read_text(), re.M)
    assert hint and hint.groups() == (default_tracking_uri(root), f"models:/{NAME}/1"), (exported / "printed.txt")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": hint.group(1), MAX_PIXELS_ENV: str(BUDGET),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", hint.group(2),
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=tmp_path_factory.mktemp("serve"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/ping"), proc, "an answer to /ping", timeout=240)
        yield url
    finally:
        stop(proc, group=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def invoke(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def check_answers(rows: list[dict], paths: list[Path], predicted: dict[Path, np.ndarray]) -> None:
    assert len(rows) == len(paths)
    for row, path in zip(rows, paths):
        assert set(row) == {*CLASSES, "label"}
        np.testing.assert_allclose([row[c] for c in CLASSES], predicted[path], rtol=0, atol=1e-5)
        assert row["label"] == CLASSES[int(np.argmax(predicted[path]))]


def test_export_registers_a_model_whose_server_answers_like_predict(root: Path, exported: Path, server: str,
                                                                    training_run: tuple[str, str],
                                                                    images: list[Path],
                                                                    predicted: dict[Path, np.ndarray]) -> None:
    client, run = mlflow_run(root, exported)
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id and version.status == "READY"
    assert (run.data.tags["registered_model"], run.data.tags["registered_model_version"]) == (NAME, "1")
    model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id and model.experiment_id == run.info.experiment_id
    # linked: the export run's description and the model version name the training run as a link (markdown)
    experiment_id, trained_id = training_run
    link = f"[train-conformer_nano-digits](#/experiments/{experiment_id}/runs/{trained_id})"
    assert run.data.tags["mlflow.note.content"] == f"Weights of the training run {link} (best val/top1_sum 91.50)."
    serve = (f"MLFLOW_TRACKING_URI={default_tracking_uri(root)} mlflow models serve -m models:/{NAME}/1 "
             "--env-manager local")
    assert link in version.description and f"Serve it with: `{serve}`" in version.description
    assert {k: version.tags[k] for k in ("source_run_id", "best val/top1_sum", "serve_command", "classes")} == {
        "source_run_id": trained_id, "best val/top1_sum": "91.50", "serve_command": serve, "classes": "10"}
    assert version.tags["input"].startswith("column 'image': base64-encoded image files or H x W x 3 pixel arrays")

    # five digits PNGs (grey 8x8) and an RGB JPEG (24x40), as files and as pixel arrays
    status, answer = invoke(server, {"dataframe_split": {"columns": ["image"],
                                                         "data": [[encoded(p)] for p in images]}})
    assert status == 200, answer
    check_answers(answer["predictions"], images, predicted)
    status, answer = invoke(server, {"inputs": [pixels(p).tolist() for p in images]})
    assert status == 200, answer
    check_answers(answer["predictions"], images, predicted)
    status, answer = invoke(server, {"inputs": {"image": [encoded(p) for p in images[-2:]]}})
    assert status == 200, answer
    check_answers(answer["predictions"], images[-2:], predicted)

    for body, message in [({"dataframe_split": {"columns": ["image"], "data": [["not base64!"]]}}, "not base64"),
                          ({"dataframe_split": {"columns": ["image"], "data": [[encoded(root / "mlflow.db")]]}},
                           "cannot read image 0"),
                          ({"dataframe_split": {"columns": ["photo"], "data": [["x"]]}},
                           "missing inputs ['image']"),  # MLflow's signature check
                          ({"inputs": [[[300, 0, 0]]]}, "integer pixels must be in [0, 255]"),
                          ({"inputs": [[[[1, 2]]]]}, "shape [1, 1, 2]"),
                          ({"inputs": {"image": []}}, "no images in the request"),
                          ({"dataframe_split": {"columns": ["image"], "data": []}}, "no images in the request")]:
        status, answer = invoke(server, body)
        assert status == 400 and message in answer["message"], answer


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_request_past_its_pixel_budget_is_refused_before_decoding(server: str) -> None:
    """Encoded files are counted by their header: a 1.3 KB PNG of 3000 x 3000 px, cut after its header so that it
    cannot even be decoded, is refused for its size; within the budget the same cut file is a decoding error."""
    big, small = png(3000, 3000), png(60, 60)
    body = {"inputs": {"image": [base64.b64encode(data).decode() for data in (small, big[:200])]}}
    status, answer = invoke(server, body)
    assert status == 400, answer
    assert ("image 0.1: a 3000 x 3000 image file (9,000,000 pixels) would take the request to 9,003,600 decoded "
            f"pixels, over its budget of {BUDGET:,}") in answer["message"], answer
    # the budget counts the whole request: two images that fit alone do not fit together
    status, answer = invoke(server, {"inputs": {"image": [base64.b64encode(png(60, 60)).decode()] * 2}})
    assert status == 400 and "image 0.1: a 60 x 60 image file" in answer["message"], answer
    status, answer = invoke(server, {"inputs": {"image": [base64.b64encode(png(60, 60)).decode()]}})
    assert status == 200, answer
    status, answer = invoke(server, {"inputs": [np.zeros((80, 80), np.uint8).tolist()]})  # pixel arrays count too
    assert status == 400 and "a 80 x 80 pixel array" in answer["message"], answer


def test_the_registered_model_loads_in_process(root: Path, exported: Path, images: list[Path],
                                               predicted: dict[Path, np.ndarray],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert model.metadata.flavors["python_function"]["code"] == "code"  # this package travels with the model
    requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}/1")).read_text().split()
    assert f"mindspore=={ms.__version__}" in requirements and "pillow" in " ".join(requirements)
    arrays = [pixels(p) for p in images]  # uint8 pixels, and the same as floats in [0, 1]
    for column in (arrays, [a / 255.0 for a in arrays], [p.read_bytes() for p in images]):
        frame = model.predict(pd.DataFrame({"image": column}))
        check_answers(frame.to_dict("records"), images, predicted)


def test_a_model_folder_names_no_code_and_a_planted_target_is_refused(root: Path, exported: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is logged from code (no pickle) and its conformer.json is data: a `_target_` planted there (an
    `open(victim, "w")` that would truncate a file if instantiated) is refused on load, and the victim is intact."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    assert not list(folder.rglob("*.pkl")), "a pickled model runs code on load"
    assert "model_code_path" in (folder / "MLmodel").read_text()
    meta_path = next(folder.rglob("conformer.json"))
    meta = json.loads(meta_path.read_text())
    assert "_target_" not in json.dumps(meta) and meta["eval_transform"]["image_size"] == 32

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for planted in ({"_target_": "builtins.open", "file": str(victim), "mode": "w"},
                    {**meta["eval_transform"], "_target_": "builtins.open", "file": str(victim), "mode": "w"}):
        meta_path.write_text(json.dumps({**meta, "eval_transform": planted}))
        with pytest.raises(Exception, match=r"conformer.json: eval_transform names code to run \(_target_="
                                             r"'builtins.open'\)"):
            mlflow.pyfunc.load_model(str(folder))
        assert victim.read_text() == "precious"
    meta_path.write_text(json.dumps({**meta, "eval_transform": {**meta["eval_transform"], "file": "x"}}))
    with pytest.raises(Exception, match=r"eval_transform has unknown keys \['file'\]"):
        mlflow.pyfunc.load_model(str(folder))
    meta_path.write_text(json.dumps(meta))  # the untouched file still loads
    assert mlflow.pyfunc.load_model(str(folder)).metadata.flavors["python_function"]["code"] == "code"
