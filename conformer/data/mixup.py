"""Mixup / CutMix on whole batches with timm's semantics (batch mode), in numpy after batching.

Per batch: with probability ``prob`` draw ``lam ~ Beta(alpha, alpha)`` for CutMix (probability ``switch_prob``
when both are enabled) or Mixup; mix every image with the image at the mirrored position of the batch
(``x[::-1]``). CutMix pastes a box of area ``(1 - lam) * H * W`` (clipped at the borders; with ``correct_lam``
lam is recomputed from the real box). Targets are ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` with
``smooth`` the label-smoothed one-hot (off = s / C, on = 1 - s + off), also for batches left unmixed.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Mixup", "cutmix_box", "mix_targets", "smooth_one_hot"]

Box = tuple[int, int, int, int]  # top, bottom, left, right (exclusive)


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """One-hot float32 ``[B, C]`` with ``1 - s + s/C`` on the label and ``s/C`` elsewhere."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]: "
                         "num_classes does not match the dataset")
    off = smoothing / num_classes
    out = np.full((labels.size, num_classes), off, dtype=np.float32)
    out[np.arange(labels.size), labels] = 1.0 - smoothing + off
    return out


def mix_targets(labels: np.ndarray, num_classes: int, lam: float, smoothing: float = 0.0) -> np.ndarray:
    """``lam * smooth(y) + (1 - lam) * smooth(y flipped)`` as float32 ``[B, C]``."""
    one_hot = smooth_one_hot(labels, num_classes, smoothing)
    return (lam * one_hot + (1.0 - lam) * one_hot[::-1]).astype(np.float32)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator,
               correct_lam: bool = True) -> tuple[Box, float]:
    """A box of about ``(1 - lam)`` of the image, centred uniformly, clipped at the borders; and its lam."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    if correct_lam:
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return (top, bottom, left, right), float(lam)


def check_mixup(mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                mode: str = "batch", label_smoothing: float = 0.1, num_classes: int | None = None, **_: Any) -> None:
    """Mixup's arguments."""
    if mode != "batch":
        raise ValueError(f"mixup mode={mode!r} is not supported: only 'batch' is implemented")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0")
    probabilities = {"prob": prob, "switch_prob": switch_prob, "label_smoothing": label_smoothing}
    for name, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"mixup {name}={value} must be in [0, 1]")
    if num_classes is not None and int(num_classes) < 2:
        raise ValueError(f"mixup num_classes={num_classes} must be >= 2")


class Mixup:
    """Batch-mode Mixup/CutMix with label smoothing; call on ``(images [B,C,H,W], labels [B])``.

    ``num_classes`` may stay ``None`` in configs: the DataModule binds it (and a seed) with ``bind``.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1,
                 correct_lam: bool = True, num_classes: int | None = None,
                 seed: int | Sequence[int] | None = None) -> None:
        check_mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing, num_classes)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.mode, self.label_smoothing, self.correct_lam = mode, float(label_smoothing), bool(correct_lam)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def bind(self, num_classes: int, seed: int | Sequence[int] | None = None) -> Mixup:
        """A fresh copy for ``num_classes`` with its own RNG; error if already bound to another count."""
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(f"mixup num_classes={self.num_classes} but the dataset has {num_classes} "
                             "classes: remove num_classes from the mixup config (it comes from the dataset)")
        bound = copy.copy(self)
        bound.num_classes, bound.seed = int(num_classes), seed
        bound.rng = np.random.default_rng(seed)
        return bound

    def draw(self) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch; lam = 1 means no mixing."""
        if self.rng.random() >= self.prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.num_classes is None:
            raise ValueError("Mixup has no num_classes: call mixup.bind(num_classes) (the DataModule does)")
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"Mixup expects images [B, C, H, W] and labels [B], got {images.shape} and "
                             f"{np.shape(labels)}")
        if len(images) % 2:
            raise ValueError(f"Mixup in batch mode needs an even batch size, got {len(images)}: use an even "
                             "batch_size with drop_last=True")
        lam, use_cutmix = self.draw()
        images = np.asarray(images, dtype=np.float32)
        if lam >= 1.0:
            out = images
        elif use_cutmix:
            (top, bottom, left, right), lam = cutmix_box(images.shape[2], images.shape[3], lam, self.rng,
                                                         self.correct_lam)
            out = images.copy()
            out[:, :, top:bottom, left:right] = images[::-1, :, top:bottom, left:right]
        else:
            # x + (1 - lam) * (x_flipped - x) == lam * x + (1 - lam) * x_flipped, in fewer memory passes
            out = images[::-1] - images
            out *= np.float32(1.0 - lam)
            out += images
        return out, mix_targets(labels, self.num_classes, lam, self.label_smoothing)

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, smoothing={self.label_smoothing}, "
                f"classes={self.num_classes})")
