"""Network weights by where they come from: the one place that reads weights into a network.

A weights spec (`model.pretrained`, `task.checkpoint`, `trainer.resume`) is one of
- a `.ckpt` written by this project (a training checkpoint or `python -m conformer.models.convert` output);
- official PyTorch Conformer weights, `.pth` / `.pt` / `.tar` (needs the [torch] extra) or `.npz`, converted on load;
- `mlflow:<run_id>`: a checkpoint of that training run (`best.ckpt`, or `last.ckpt` to resume), found in the run's
  dir or else downloaded from its artifacts.
Specs are checked before anything is built (conformer.config.validation.check_weights).
"""
from __future__ import annotations

import logging
from pathlib import Path

from mindspore import nn

from conformer.models.checkpoint_file import load_raw, load_weights
from conformer.models.convert import infer_num_classes, load_official_weights, read_state_dict
from conformer.vocabulary import CHECKPOINT_SUFFIXES

log = logging.getLogger(__name__)
HEAD_PARAMETERS = ("conv_cls_head.weight", "conv_cls_head.bias", "trans_cls_head.weight", "trans_cls_head.bias")


def num_classes(path: Path) -> int:
    """Class count of a weights file, read from its conv classifier head."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return infer_num_classes(read_state_dict(path))
    head = load_raw(path, choice_func=lambda name: name == "conv_cls_head.bias")
    if not head:
        raise ValueError(f"{path} has no conv_cls_head.bias: is it a Conformer checkpoint?")
    return int(head["conv_cls_head.bias"].shape[0])


def load_into(network: nn.Cell, path: Path, ema: bool = False, fine_tune: bool = False) -> list[str]:
    """Load every weight of `path` into `network` (names and shapes must match); `ema` loads a checkpoint's EMA
    copy instead of its live weights.

    `fine_tune`: when the file has another class count than the network, its classifier heads are left out (they
    keep their fresh init, a warning lists them) and everything else must still match. Returns the names left out.
    """
    skip: tuple[str, ...] = ()
    if fine_tune and (classes := num_classes(path)) != network.num_classes:
        skip = HEAD_PARAMETERS
        log.warning("fine-tuning: %s has %d classes, the model %d: its classifier heads are not loaded and start "
                    "fresh (%s)", path, classes, network.num_classes, ", ".join(skip))
    if path.suffix in CHECKPOINT_SUFFIXES:
        load_weights(path, network, strict=True, ema=ema, skip=skip)
    else:
        load_official_weights(network, path, skip=skip)
    log.info("loaded the %sweights of %s", "EMA " if ema else "", path)
    return list(skip)
