"""task=predict: top-k classes of image files, with the eval preprocessing and softmax(conv + trans logits).

Files that cannot be read or decoded are skipped: printed with the reason and listed in ``predictions.csv`` with
empty label/prob columns and the reason in its ``error`` column (empty for predicted images).
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from conformer.data.inputs import check_class_count, class_names_file, image_inputs
from conformer.data.sources import file_problem
from conformer.serving.inference import load_image, predict_probabilities
from conformer.tasks.common import RunContext, open_run, task_tracker, trained_network
from conformer.tracking.summary import image_dataset

log = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.csv"


def bad_images(paths: Sequence[Path]) -> dict[Path, str]:
    """The inputs that cannot be read or decoded, with the reason; fails before anything is compiled when no
    input is readable."""
    problems = {path: problem for path in paths if (problem := file_problem(path))}
    if len(problems) == len(paths):
        shown = "; ".join(f"{path} ({problem})" for path, problem in list(problems.items())[:10])
        more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"none of the {len(paths)} input images can be read: {shown}{more}")
    return problems


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


def class_labels(cfg: DictConfig, num_classes: int) -> list[str]:
    """The names of the weights' `num_classes` classes (`class_names`, checked against the weights), else their
    indices."""
    names = class_names(cfg)
    if names is not None:
        check_class_count(len(names), num_classes, cfg.task.get("classes") or f"data={cfg.data.name}")
    return names or [str(i) for i in range(num_classes)]


def shown(path: Path | str) -> str:
    """A file name as it may be printed or written to the CSV: bytes that are not UTF-8 as `\\xNN`, control
    characters (a newline would forge an output line) escaped as in Python, the rest as is."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() or char == " " else ascii(char)[1:-1] for char in text)


def write_predictions(handle, paths: Sequence[Path], problems: dict[Path, str],
                      probabilities: Iterable[np.ndarray], labels: Sequence[str], topk: int) -> None:
    """One CSV row per input, in input order: the top-k of a predicted image, or the reason a bad one was skipped.

    ``probabilities`` holds one row per readable input (the inputs not in ``problems``), in order.
    """
    writer = csv.writer(handle)
    columns = [f"{kind}_{i}" for i in range(1, topk + 1) for kind in ("label", "prob")]
    writer.writerow(["path", *columns, "error"])
    predicted = iter(probabilities)
    for image_path in paths:
        name = shown(image_path)
        if image_path in problems:
            problem = shown(problems[image_path])  # names the file too
            writer.writerow([name, *[""] * len(columns), problem])
            print(f"{name}: skipped ({problem})")
            continue
        row = next(predicted)
        best = np.argsort(-row, kind="stable")[:topk]
        writer.writerow([name, *[v for c in best for v in (labels[c], float(row[c]))], ""])
        print(f"{name}: " + ", ".join(f"{labels[c]} {row[c]:.1%}" for c in best))


def predict(ctx: RunContext) -> None:
    """Classify `task.inputs`; prints the top-k per image and writes `<run_dir>/predictions.csv` (bad files listed,
    not predicted)."""
    cfg = ctx.cfg
    paths = image_inputs(cfg.task.inputs)
    problems = bad_images(paths)
    if not ctx.group.is_main:
        return None
    readable = [p for p in paths if p not in problems]
    network, weights = trained_network(ctx)  # the class count comes from the weights
    num_classes = network.num_classes
    labels = class_labels(cfg, num_classes)
    transform = instantiate(cfg.data.eval_transform)
    batches = predict_probabilities(network, transform, map(load_image, readable),
                                    min(cfg.task.batch_size, len(readable)))

    path = ctx.run_dir / PREDICTIONS_FILE
    tracker = task_tracker(ctx)
    with tracker:
        open_run(tracker, ctx, weights=weights, extra_tags={"images": len(readable), "skipped_images": len(problems)})
        inputs = cfg.task.inputs if isinstance(cfg.task.inputs, str) else ", ".join(map(str, cfg.task.inputs))
        tracker.log_inputs([image_dataset("predict inputs", inputs, "inference", len(readable), num_classes,
                                          transform.image_size)], "inference")
        with path.open("w", newline="") as handle:
            write_predictions(handle, paths, problems, (row for batch in batches for row in batch), labels,
                              min(cfg.task.topk, num_classes))
        tracker.log_artifact(path)
    if problems:
        log.warning("skipped %d of %d input images that cannot be read (listed in %s)", len(problems), len(paths),
                    path)
    log.info("predicted %d images with %s -> %s", len(readable), weights, path)
    return None
