"""The MINDIR export as an MLflow pyfunc model that `mlflow models serve` runs: images in, class probabilities out.

Artifacts: the MINDIR file and `conformer.json` (class names, the eval transform's parameters, the export's fixed batch
size): plain data, parsed and checked by `parse_meta` (only known keys, each value of its kind). Nothing in the
model's files names code to run: the model is logged "from code" (MLflow's way without a pickle:
`python_model=served_model.py`, which calls `mlflow.models.set_model`), and the eval transform is always
`EvalTransform`, built from the parameters. A `_target_` or any unknown key is refused with `ModelFilesError`.
Code: this package (`code_paths`), so serving needs only MindSpore and the package's own dependencies.
Input: a column `image` whose cells are base64-encoded image files (PNG, JPEG, ...; raw bytes in process) or pixel
arrays (H x W x 3 RGB or H x W grey; integers 0-255 or floats 0-1); a JSON request's `inputs` may also be a plain
list of such images. Output: one column of probabilities
per class name and `label`, the most probable class. Decoding, preprocessing and softmax(conv + trans) are
task=predict's (conformer.serving.inference), so a served model answers as task=predict does.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types.schema import AnyType, ColSpec, Schema

from conformer.runtime.paths import PACKAGE_DIR
from conformer.serving.inference import decode_image, image_size, predict_probabilities

log = logging.getLogger(__name__)
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
MODEL_NAME = "model"  # the logged model's name in its run
META_FILE = "conformer.json"
META_FORMAT = 1  # the version of conformer.json's layout
MODEL_CODE = PACKAGE_DIR / "serving" / "served_model.py"  # what MLflow runs to build the model (models from code)
# The eval transform a served model applies, by its parameters; no other class is ever built from a model's files.
EVAL_TRANSFORM_TARGET = "conformer.data.transforms.EvalTransform"
EVAL_TRANSFORM_KEYS = ("image_size", "crop_pct", "interpolation", "mean", "std")
# What the served model imports besides mlflow (conformer.serving.inference, conformer.data.transforms, the package
# root).
REQUIREMENTS = ("mindspore", "numpy", "pandas", "pillow", "hydra-core", "omegaconf", "psutil")


class BadInput(MlflowException):
    """A request the model cannot answer; the scoring server returns it as HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# ---------------------------------------------------------------------------------------------------- input
MAX_PIXELS_ENV = "CONFORMER_MAX_REQUEST_PIXELS"  # the served model's budget of decoded pixels per request
DEFAULT_MAX_REQUEST_PIXELS = 50_000_000  # ~150 MB of RGB pixels: about 1,000 images of 224 x 224


def max_request_pixels() -> int:
    """The budget of decoded pixels per request: env `CONFORMER_MAX_REQUEST_PIXELS` (of the serving process), else
    `DEFAULT_MAX_REQUEST_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        budget = int(value) if value else DEFAULT_MAX_REQUEST_PIXELS
    except ValueError:
        budget = 0
    if budget < 1:
        raise BadInput(f"{MAX_PIXELS_ENV}={value!r} must be a whole number of pixels > 0")
    return budget


class _Budget:
    """The pixels a request may still decode: each image is checked (an encoded file by its header) before it is
    decoded, so a request past the budget is answered before the memory is spent."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, pixels: int, index: int | str, shape: str) -> None:
        if self.used + pixels > self.limit:
            raise BadInput(f"image {index}: {shape} ({pixels:,} pixels) would take the request to "
                           f"{self.used + pixels:,} decoded pixels, over its budget of {self.limit:,} "
                           f"({MAX_PIXELS_ENV}): send fewer or smaller images per request")
        self.used += pixels


def _pixels(array: np.ndarray, index: int) -> np.ndarray:
    """RGB uint8 H x W x 3 from a grey or RGB pixel array (integers 0-255 or floats 0-1)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)  # as PIL converts grey to RGB
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise BadInput(f"image {index}: a pixel array of shape {list(array.shape)}; send H x W x 3 (RGB) or H x W "
                       "(grey) pixels, or a base64-encoded image file")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise BadInput(f"image {index}: integer pixels must be in [0, 255], got [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise BadInput(f"image {index}: float pixels must be finite and in [0, 1] (or send integers 0-255)")
        return np.rint(array * 255.0).astype(np.uint8)
    raise BadInput(f"image {index}: pixels of type {array.dtype}; send integers 0-255 or floats 0-1")


def _encoded(data: str | bytes, index: int | str, budget: _Budget) -> np.ndarray:
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadInput(f"image {index}: a string that is not base64 ({err})") from err
    size = image_size(bytes(data))
    if size is not None:
        budget.take(size[0] * size[1], index, f"a {size[0]} x {size[1]} image file")
    try:
        return decode_image(bytes(data), f"image {index}")
    except ValueError as err:
        raise BadInput(f"{err}: send a PNG, JPEG, BMP or WebP file, base64-encoded") from err


def _cell_images(cell: Any, index: int, budget: _Budget) -> list[np.ndarray]:
    """The images of one input cell: an encoded file, a pixel array, or a list of encoded files (the request
    `{"inputs": {"image": [...]}}` arrives as one such cell; an empty list holds none)."""
    if isinstance(cell, (str, bytes, bytearray)):
        return [_encoded(cell, index, budget)]
    if isinstance(cell, (list, tuple, np.ndarray)):
        if not len(cell):
            return []
        if all(isinstance(item, (str, bytes, bytearray)) for item in cell):
            return [_encoded(item, f"{index}.{i}", budget) for i, item in enumerate(cell)]
        try:
            array = np.asarray(cell)
        except ValueError as err:
            raise BadInput(f"image {index}: rows of different lengths are not a pixel array ({err})") from err
        image = _pixels(array, index)
        budget.take(image.shape[0] * image.shape[1], index, f"a {image.shape[1]} x {image.shape[0]} pixel array")
        return [image]
    raise BadInput(f"image {index}: a {type(cell).__name__}; send a base64-encoded image file or a pixel array")


def input_images(model_input: Any, max_pixels: int | None = None) -> list[np.ndarray]:
    """RGB uint8 images of a request: a DataFrame (or mapping) with a column `image`, a batch array N x H x W x C,
    or a list of cells; at most `max_pixels` decoded pixels in all (None: `max_request_pixels()`), else BadInput
    before the image that would pass it is decoded."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise BadInput(f"expected a column {IMAGE_COLUMN!r} (base64-encoded image files or pixel arrays), got "
                           f"columns {[str(c) for c in model_input.columns]}")
        cells = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, Mapping) and IMAGE_COLUMN in model_input:
        cells = list(model_input[IMAGE_COLUMN])
    elif isinstance(model_input, (np.ndarray, list, tuple)):
        cells = list(model_input)
    else:
        raise BadInput(f"cannot read images from a {type(model_input).__name__}: send a column {IMAGE_COLUMN!r}")
    budget = _Budget(max_pixels or max_request_pixels())
    images = [image for index, cell in enumerate(cells) for image in _cell_images(cell, index, budget)]
    if not images:
        raise BadInput("no images in the request: send a column 'image' of base64-encoded image files or pixel "
                       "arrays")
    return images


# ---------------------------------------------------------------------------------------------------- files
class ModelFilesError(MlflowException):
    """A model folder whose `conformer.json` is not what the export writes (altered, or not ours): one line."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{META_FILE}: {message}", error_code=INVALID_PARAMETER_VALUE)


def _printable(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _known_keys(node: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    if "_target_" in node:
        raise ModelFilesError(f"{where} names code to run (_target_={_printable(node['_target_'])}): a model's files "
                              "are data only and nothing in them is run; this model folder was altered or not "
                              "written by conformer's export")
    unknown = sorted(str(key) for key in node if key not in keys)
    if unknown:
        raise ModelFilesError(f"{where} has unknown keys {unknown}: expected {list(keys)}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFilesError(f"{where}={_printable(value)} must be a finite number")
    return float(value)


def transform_params(eval_transform: Mapping[str, Any], where: str = "eval_transform") -> dict[str, Any]:
    """The parameters of an eval transform (a config node or the json's), checked: only `EvalTransform`'s keys, each
    of its kind; a `_target_` is accepted only as the config's own `EvalTransform` (no other class is served)."""
    if not isinstance(eval_transform, Mapping):
        raise ModelFilesError(f"{where} must be a mapping of {list(EVAL_TRANSFORM_KEYS)}")
    params = {str(key): value for key, value in eval_transform.items()}
    _known_keys(params, EVAL_TRANSFORM_KEYS, where)
    if "image_size" not in params:
        raise ModelFilesError(f"{where} has no image_size")
    size = params["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ModelFilesError(f"{where}.image_size={_printable(size)} must be a positive integer")
    if "crop_pct" in params:
        params["crop_pct"] = _number(params["crop_pct"], f"{where}.crop_pct")
    if "interpolation" in params and not isinstance(params["interpolation"], str):
        raise ModelFilesError(f"{where}.interpolation={_printable(params['interpolation'])} must be a string")
    for key in ("mean", "std"):
        if key in params:
            values = params[key]
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ModelFilesError(f"{where}.{key}={_printable(values)} must be 3 numbers (RGB)")
            params[key] = [_number(v, f"{where}.{key}") for v in values]
    from conformer.data.arguments import check_eval_transform

    try:
        check_eval_transform(**params)
    except ValueError as err:
        raise ModelFilesError(f"{where}: {err}") from err
    return params


def served_transform(eval_transform: Mapping[str, Any]) -> dict[str, Any]:
    """The plain parameters a served model stores for `data.eval_transform` (a resolved config node): refused
    (ValueError) when the node builds another class than `EvalTransform`, whose parameters alone would not rebuild
    it."""
    node = dict(eval_transform)
    target = node.pop("_target_", EVAL_TRANSFORM_TARGET)
    if target != EVAL_TRANSFORM_TARGET:
        raise ValueError(f"data.eval_transform._target_={target}: a served model applies {EVAL_TRANSFORM_TARGET} "
                         "from its parameters only (its files name no code); export with that transform")
    try:
        return transform_params(node, "data.eval_transform")
    except ModelFilesError as err:
        raise ValueError(err.message.removeprefix(f"{META_FILE}: ")) from err


def parse_meta(text: str) -> dict[str, Any]:
    """`conformer.json` as checked plain data: {format, class_names, eval_transform, batch_size}."""
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ModelFilesError(f"not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ModelFilesError(f"expected a JSON object, got {type(meta).__name__}")
    _known_keys(meta, ("format", "class_names", "eval_transform", "batch_size"), "the file")
    if meta.get("format", META_FORMAT) != META_FORMAT:
        raise ModelFilesError(f"format {_printable(meta.get('format'))} is not {META_FORMAT}: written by another "
                              "version of conformer")
    names = meta.get("class_names")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names) or LABEL_COLUMN in names):
        raise ModelFilesError(f"class_names must be a non-empty list of unique strings other than {LABEL_COLUMN!r}")
    batch = meta.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ModelFilesError(f"batch_size={_printable(batch)} must be a positive integer")
    eval_transform = meta.get("eval_transform")
    if isinstance(eval_transform, Mapping) and eval_transform.get("_target_") == EVAL_TRANSFORM_TARGET:
        # models exported before the format was versioned spelt the class out: compared here, never imported
        eval_transform = {k: v for k, v in eval_transform.items() if k != "_target_"}
    return {"format": META_FORMAT, "class_names": names, "batch_size": batch,
            "eval_transform": transform_params(eval_transform)}


# ---------------------------------------------------------------------------------------------------- model
class ConformerModel(PythonModel):
    """The exported Conformer, run with MindSpore on the CPU (`ms.load` + `nn.GraphCell`)."""

    def load_context(self, context: PythonModelContext) -> None:
        import mindspore as ms
        from mindspore import nn

        from conformer.data.transforms import EvalTransform

        meta = parse_meta(Path(context.artifacts["meta"]).read_text())  # before anything else is loaded
        try:
            ms.set_device("CPU")
        except RuntimeError as err:  # this process already runs MindSpore on another device: the model runs there
            log.warning("the served model runs on this process's device, not the CPU: %s", str(err).splitlines()[0])
        self.network = nn.GraphCell(ms.load(context.artifacts["mindir"]))
        self.transform = EvalTransform(**meta["eval_transform"])
        self.class_names: list[str] = meta["class_names"]
        self.batch_size: int = meta["batch_size"]
        self._lock = threading.Lock()  # the server may call predict from several threads; one graph runs at a time

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        images = input_images(model_input)
        with self._lock:
            rows = np.concatenate(list(predict_probabilities(self.network, self.transform, images, self.batch_size)))
        frame = pd.DataFrame(rows, columns=self.class_names)
        frame[LABEL_COLUMN] = [self.class_names[i] for i in rows.argmax(axis=1)]
        return frame


def signature(class_names: Sequence[str]) -> ModelSignature:
    """Input: the column `image` (base64 strings or pixel arrays, so of any type); output: a probability per
    class and the label."""
    outputs = [ColSpec("double", name) for name in class_names] + [ColSpec("string", LABEL_COLUMN)]
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]), outputs=Schema(outputs))


def requirements() -> list[str]:
    """The serving environment's packages, pinned to the versions that exported the model."""
    pinned = []
    for package in REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


def log_pyfunc_model(tracking_uri: str, run_id: str, mindir: Path, class_names: Sequence[str],
                     eval_transform: Mapping[str, Any], batch_size: int,
                     registered_name: str | None = None) -> ModelInfo:
    """Log `mindir` as the pyfunc model `model` of run `run_id` (and register it as `registered_name`)."""
    if LABEL_COLUMN in class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique and not {LABEL_COLUMN!r} (an output column): {class_names}")
    text = json.dumps({"format": META_FORMAT, "class_names": [str(n) for n in class_names],
                       "eval_transform": served_transform(eval_transform), "batch_size": int(batch_size)}, indent=2)
    parse_meta(text)  # what the served model will read back
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: MLflow would otherwise file it under the default experiment.
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with TemporaryDirectory() as tmp:
        meta = Path(tmp) / META_FILE
        meta.write_text(text)
        with _use_tracking_uri(tracking_uri):  # Model.log and the registry resolve the store globally
            return Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=logged.model_id, registered_model_name=registered_name,
                             python_model=str(MODEL_CODE), artifacts={"mindir": str(mindir), "meta": str(meta)},
                             code_paths=[str(PACKAGE_DIR)], signature=signature(class_names),
                             pip_requirements=requirements())
