"""task=export: the network in eval mode as a MINDIR / ONNX (/ AIR on Ascend) file for deployment."""
from __future__ import annotations

import logging
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from omegaconf import DictConfig, OmegaConf

from conformer import kernels
from conformer.models.checkpoint_file import read_checkpoint_meta
from conformer.models.registry import model_name
from conformer.secrets import without_user_info
from conformer.tasks.common import RunContext, open_run, task_tracker, trained_network, weights_origin
from conformer.tasks.predict import class_labels
from conformer.tracking import Tracker
from conformer.vocabulary import EXPORT_OUTPUTS, EXPORT_SUFFIXES

log = logging.getLogger(__name__)


class ExportNetwork(nn.Cell):
    """What a deployed model returns: the prediction (conv + trans logits) or both heads' logits."""

    def __init__(self, network: nn.Cell, output: str = "sum") -> None:
        super().__init__(auto_prefix=False)  # keep the network's parameter names
        if output not in EXPORT_OUTPUTS:
            raise ValueError(f"output={output!r}; choose one of {', '.join(EXPORT_OUTPUTS)}")
        self.network = network
        self.both = output == "both"

    def construct(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        conv, trans = self.network(x)
        if self.both:
            return conv, trans
        return conv + trans


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - poly(t) exp(-z^2), t = 1 / (1 + P z), z >= 0, |error| <= 1.5e-7.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


class PolyErfGELU(nn.Cell):
    """Exact (erf) GELU from ops ONNX export supports: MindSpore 2.10 cannot write Erf to ONNX.

    The erf approximation errs by at most 1.5e-7, below float32 resolution of the activations.
    """

    def construct(self, x: Tensor) -> Tensor:
        z = ops.abs(x) * 0.7071067811865476
        t = ops.ones_like(z) / (1.0 + _ERF_P * z)  # a scalar numerator would become Reciprocal: not exportable
        poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
        tail = 0.5 * poly * ops.exp(-z * z)  # Phi(-|x|)
        return x * ops.select(x >= 0, 1.0 - tail, tail)


def _onnx_replacement(cell: nn.Cell) -> nn.Cell | None:
    if isinstance(cell, nn.GELU) and cell.approximate == "none":
        return PolyErfGELU()
    return None


def make_onnx_compatible(network: nn.Cell) -> int:
    """Swap, in place, the cells MindSpore cannot write to ONNX for equivalents; returns how many it swapped."""
    swapped = 0
    for _, parent in list(network.cells_and_names()):
        for name, child in list(parent.name_cells().items()):
            replacement = _onnx_replacement(child)
            if replacement is not None:
                setattr(parent, name, replacement)
                swapped += 1
    return swapped


def export_path(file: str | None, run_dir: Path, model_name: str | None, fmt: str) -> Path:
    """The file MindSpore writes: `file` (or <run_dir>/<model name>) with the format's suffix."""
    suffix = EXPORT_SUFFIXES[fmt]
    base = Path(file).expanduser() if file else run_dir / (model_name or "conformer")
    return base if base.suffix.lower() == suffix else base.with_name(base.name + suffix)


def export(ctx: RunContext) -> None:
    """Export `task.checkpoint` as configured (checked by conformer.config.validation); only the main process writes."""
    cfg = ctx.cfg
    fmt, output = str(cfg.task.format).upper(), cfg.task.output
    if not ctx.group.is_main:
        return None
    with kernels.using("mindspore"):  # the file runs where our compiled CPU kernels do not exist
        network, weights = trained_network(ctx)  # the class count comes from the weights, not the data
    shape = (cfg.task.batch_size, network.in_chans, cfg.data.image_size, cfg.data.image_size)
    if fmt == "ONNX":
        log.info("ONNX: swapped %d cells for exportable equivalents", make_onnx_compatible(network))
    path = export_path(cfg.task.file, ctx.run_dir, model_name(cfg.model), fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    register = cfg.task.get("register")
    serve = bool(cfg.task.get("log_model") or register)
    labels = class_labels(cfg, network.num_classes) if serve else None  # fails before the export's compile
    served = served_eval_transform(cfg) if serve else None  # so does a transform a served model cannot hold

    tracker = task_tracker(ctx)
    with tracker:
        open_run(tracker, ctx, weights=weights, extra_tags={"format": fmt, "output": output})
        # file_name keeps its suffix: MindSpore adds one only when it is missing
        ms.export(ExportNetwork(network, output), Tensor(np.zeros(shape, np.float32)), file_name=str(path),
                  file_format=fmt)
        if not path.is_file():
            raise RuntimeError(f"MindSpore reported no error but wrote no {path}")
        if serve:  # the model's artifacts hold the MINDIR: not stored twice
            version, command = log_served_model(tracker, cfg, path, labels, served, register)
            if version is not None:
                describe_version(tracker, cfg, weights, register, version, command, len(labels))
        else:
            tracker.log_artifact(path, "export")
    print(f"exported {model_name(cfg.model)} ({output} logits, input {list(shape)}) to {path}")
    log.info("exported %s with %s to %s (%.1f MB)", model_name(cfg.model), weights, path, path.stat().st_size / 2**20)
    return None


def served_eval_transform(cfg: DictConfig) -> dict:
    """`data.eval_transform` as the plain parameters a served model stores (ValueError for a transform it cannot)."""
    from conformer.serving.pyfunc_model import served_transform  # pandas, the pyfunc flavor: only when asked

    return served_transform(OmegaConf.to_container(cfg.data.eval_transform, resolve=True))


def log_served_model(tracker: Tracker, cfg: DictConfig, path: Path, labels: list[str], eval_transform: dict,
                     register: str | None) -> tuple[str | None, str]:
    """The MINDIR as the run's MLflow pyfunc model (registered as `register`); prints how to serve it. Returns (the
    registered version or None, the serve command)."""
    from conformer.serving.pyfunc_model import log_pyfunc_model

    info = log_pyfunc_model(tracker.uri, tracker.run_id, path, labels, eval_transform, cfg.task.batch_size,
                            registered_name=register)
    uri = info.model_uri
    if register:
        uri = f"models:/{register}/{info.registered_model_version}"
        tracker.set_tags({"registered_model": register, "registered_model_version": info.registered_model_version})
    tracker.set_tags({"model_uri": info.model_uri})
    command = f"MLFLOW_TRACKING_URI={without_user_info(tracker.uri)} mlflow models serve -m {uri} --env-manager local"
    print(f"logged the MLflow model {uri}; serve it with: {command}")
    return (str(info.registered_model_version) if register else None), command


def describe_version(tracker: Tracker, cfg: DictConfig, weights: Path, register: str, version: str, command: str,
                     classes: int) -> None:
    """The registered version's description and tags: its training run (a link), the checkpoint's best value (val
    accuracy), what a request sends, the class count and the serve command."""
    trained_by, _ = weights_origin(cfg.task.checkpoint, weights)
    meta = read_checkpoint_meta(weights) if weights.suffix == ".ckpt" else {}
    monitor, best = meta.get("monitor"), meta.get("best_metric")
    details = {**({f"best {monitor}": f"{best:.2f}"} if monitor and best is not None else {}),
               "input": f"column 'image': base64-encoded image files or H x W x 3 pixel arrays, evaluated at "
                        f"{cfg.data.image_size} x {cfg.data.image_size} px",
               "classes": classes}
    tracker.describe_model_version(register, version, source_run_id=trained_by, served_by=command, details=details)
