"""task=predict: top-k classes of image files, with the eval preprocessing and softmax(conv + trans logits)."""
from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from mindspore import Tensor
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from conformer.data.transforms import EvalTransform
from conformer.tasks.common import RunContext, open_run, task_tracker, trained_network
from conformer.validation import check_class_count, class_names_file, image_inputs

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.csv"


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
        return class_names_file(cfg.task.classes)
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


def predict(ctx: RunContext) -> None:
    """Classify `task.inputs`; prints the top-k per image and writes `<run_dir>/predictions.csv`."""
    cfg = ctx.cfg
    paths = image_inputs(cfg.task.inputs)
    check_images(paths)
    if not ctx.group.is_main:
        return None
    network, weights = trained_network(ctx)  # the class count comes from the weights
    num_classes = network.num_classes
    names = class_names(cfg)
    if names is not None:
        check_class_count(len(names), num_classes, cfg.task.classes or f"data={cfg.data.name}")
    labels = names or [str(i) for i in range(num_classes)]
    topk = min(cfg.task.topk, num_classes)
    transform = instantiate(cfg.data.eval_transform)
    batch_size = min(cfg.task.batch_size, len(paths))

    path = ctx.run_dir / PREDICTIONS_FILE
    tracker = task_tracker(ctx)
    with tracker:
        open_run(tracker, ctx, extra_tags={"weights": weights, "images": len(paths)})
        with path.open("w", newline="") as handle:
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
        tracker.log_artifact(path)
    log.info("predicted %d images with %s -> %s", len(paths), weights, path)
    return None
