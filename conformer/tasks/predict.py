"""task=predict: top-k classes of image files, with the eval preprocessing and softmax(conv + trans logits)."""
from __future__ import annotations

import csv
import glob
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from mindspore import Tensor
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conformer.data.folders import IMAGE_EXTENSIONS
from conformer.data.transforms import EvalTransform
from conformer.runtime import (
    RunContext,
    build_trained_network,
    open_run,
    task_tracker,
    task_weights,
    weights_num_classes,
)
from conformer.validation import ConfigError

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.csv"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(inputs: str | Sequence[str] | None) -> list[Path]:
    """Image files named by `inputs`: files, folders (recursive) or globs, in order, without duplicates."""
    if not inputs:
        raise ConfigError("task.inputs is required: an image file, a folder or a glob, e.g. "
                          "task.inputs=photos/cat.jpg or task.inputs='photos/**/*.png'")
    specs = [inputs] if isinstance(inputs, str) else [str(spec) for spec in inputs]
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image(p))
        else:
            files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image(p))
        if not files:
            kind = "folder" if path.is_dir() else "glob" if glob.has_magic(spec) else "path"
            raise ConfigError(f"task.inputs: the {kind} {spec!r} matches no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); check the path (relative to {Path.cwd()})")
        found.update(dict.fromkeys(files))
    return list(found)


def check_images(paths: Sequence[Path]) -> None:
    """Fail before anything is compiled when an input is not a readable image."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many types for broken files; all mean "cannot read"
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"cannot read {len(bad)} of {len(paths)} input images: {shown}")


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 HWC pixels of an image file (grey and palette images are converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def class_names(cfg: DictConfig) -> list[str] | None:
    """`task.classes` (a file, one name per line), else the data source's classes, else None (indices)."""
    if cfg.task.get("classes"):
        path = Path(str(cfg.task.classes)).expanduser()
        if not path.is_file():
            raise ConfigError(f"task.classes={cfg.task.classes}: no such file (one class name per line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"task.classes={path} holds no class names (one per line)")
        return names
    try:
        return list(instantiate(cfg.data.source).classes)
    except (OmegaConfBaseException, InstantiationException) as err:
        reason = str(err.__cause__ or err).splitlines()[0]
        log.warning("no class names (data source %s unavailable: %s): reporting class indices; set "
                    "task.classes=<file with one name per line> for names", cfg.data.name, reason)
        return None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_probabilities(network, transform: EvalTransform, paths: Sequence[Path],
                          batch_size: int) -> Iterator[np.ndarray]:
    """softmax(conv + trans) per image, batch by batch; short batches are padded so one graph serves all."""
    ops = transform.operations(decode=False)
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            image = load_image(path)
            for op in ops:
                image = op(image)
            images.append(image)
        count = len(images)
        batch = np.zeros((batch_size, *images[0].shape), np.float32)
        batch[:count] = np.stack(images)
        conv, trans = network(Tensor(batch))
        yield _softmax(conv.asnumpy()[:count] + trans.asnumpy()[:count])


def _positive(task: DictConfig, key: str) -> int:
    value = task.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"task.{key}={value!r} must be a positive integer")
    return value


def predict(ctx: RunContext) -> None:
    """Classify `task.inputs`; prints the top-k per image and writes `<run_dir>/predictions.csv`."""
    cfg = ctx.cfg
    topk, batch_size = _positive(cfg.task, "topk"), _positive(cfg.task, "batch_size")
    inputs = cfg.task.get("inputs")
    paths = find_images(OmegaConf.to_container(inputs) if isinstance(inputs, ListConfig) else inputs)
    weights = task_weights(cfg)
    check_images(paths)
    if not ctx.group.is_main:
        return None
    num_classes = weights_num_classes(weights)
    names = class_names(cfg)
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"the weights have {num_classes} classes but {len(names)} class names came from "
                          f"{cfg.task.classes or f'data={cfg.data.name}'}: choose the data config the weights were "
                          "trained on, or set task.classes=<file with one name per line>")
    labels = names or [str(i) for i in range(num_classes)]
    topk = min(topk, num_classes)
    transform = instantiate(cfg.data.eval_transform)
    network = build_trained_network(cfg, weights, num_classes)
    batch_size = min(batch_size, len(paths))
    network.check_input_shape((batch_size, network.in_chans, transform.image_size, transform.image_size))

    path = ctx.run_dir / PREDICTIONS_FILE
    tracker = task_tracker(ctx)
    with tracker, path.open("w", newline="") as handle:
        open_run(tracker, ctx, "predict", extra_tags={"weights": weights, "images": len(paths)})
        writer = csv.writer(handle)
        writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, topk + 1) for kind in ("label", "prob")])
        done = 0
        for probs in predict_probabilities(network, transform, paths, batch_size):
            for image_path, row in zip(paths[done:done + len(probs)], probs):
                best = np.argsort(-row, kind="stable")[:topk]
                writer.writerow([str(image_path)] + [v for c in best for v in (labels[c], float(row[c]))])
                shown = ", ".join(f"{labels[c]} {row[c]:.1%}" for c in best)
                print(f"{image_path}: {shown}")
            done += len(probs)
        handle.close()
        tracker.log_artifact(path)
    log.info("predicted %d images with %s -> %s", len(paths), weights, path)
    return None
