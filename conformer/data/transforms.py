"""Train and eval image transforms as lists of ``mindspore.dataset`` operations (timm's create_transform).

Train: decode + RandomResizedCrop (fused for encoded input), horizontal flip, RandAugment (timm spec, Python),
normalise to CHW float32, random erasing (Python, after normalisation). Eval: resize the shorter side to
``int(image_size / crop_pct)``, center crop, normalise, with torchvision's sizes and offsets (``ResizeCenterCrop``).
``bicubic`` is PIL's bicubic (MindSpore ``PILCUBIC``, pixel-identical to PIL), as timm uses.

``stages(decode)`` groups the ops into consecutive ``map`` calls and marks the GIL-bound Python stage
(RandAugment on uint8 images) as worth worker processes; C ops and light Python ops (erasing, the eval crop) stay
on threads, so only small uint8 images cross process boundaries. ``operations(decode)`` is the flat op list.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mindspore.dataset.vision as vision
import numpy as np
from mindspore.dataset.vision import Inter

from conformer.data.arguments import (
    INTERPOLATION_NAMES,
    check_eval_transform,
    check_interpolation,
    check_normalisation,
    check_pair,
    check_train_transform,
)
from conformer.data.erasing import RandomErasing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "EvalTransform", "ResizeCenterCrop", "Stage",
           "TrainTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = dict(zip(INTERPOLATION_NAMES, (Inter.PILCUBIC, Inter.BILINEAR, Inter.NEAREST)))


def _interpolation(name: str) -> Inter:
    return INTERPOLATIONS[check_interpolation(name)]


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side at ``size``, the longer at ``int(size * long / short)`` (torchvision)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_offset(length: int, crop: int) -> int:
    """torchvision's (>= 0.9) center crop start ``int(round((length - crop) / 2))``: ties round half to even."""
    return int(round((length - crop) / 2.0))


class ResizeCenterCrop:
    """torchvision's ``Resize(resize_size)`` + ``CenterCrop(crop_size)`` on one HWC image, pixel for pixel.

    MindSpore's ``Resize(int)`` computes the longer side in float32 (one pixel short where
    ``size * long / short`` is a whole number, e.g. 235 * 494 / 470) and its ``CenterCrop`` floors the offset
    (79 for 383 -> 224 where torchvision takes 80), so both are computed here per image and the resampling stays
    MindSpore's op. torchvision 0.6-0.8 rounded ties up instead (``int((length - crop + 1) * 0.5)``).
    """

    def __init__(self, resize_size: int, crop_size: int, interpolation: str = "bicubic") -> None:
        if crop_size > resize_size:
            raise ValueError(f"crop_size={crop_size} must not exceed resize_size={resize_size}")
        self.resize_size, self.crop_size = resize_size, crop_size
        self.interpolation = _interpolation(interpolation)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        size = shorter_side_size(image.shape[0], image.shape[1], self.resize_size)
        if size != image.shape[:2]:  # torchvision leaves an image of the right size untouched
            image = vision.Resize(size, interpolation=self.interpolation)(image)
        top, left = (center_crop_offset(length, self.crop_size) for length in size)
        return np.ascontiguousarray(image[top:top + self.crop_size, left:left + self.crop_size])


@dataclass(frozen=True)
class Stage:
    """Ops mapped together; ``processes``: GIL-bound Python work that deserves worker processes."""

    ops: list = field(default_factory=list)
    processes: bool = False


class _Normalised:
    """Shared normalisation (uint8 HWC -> (x - 255 mean) / (255 std) as float32 CHW) and the flat op list."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = check_normalisation(mean, std)

    def _normalise_ops(self) -> list:
        # transposing the uint8 image first moves 4x fewer bytes
        return [vision.HWC2CHW(), vision.Normalize(mean=[255.0 * m for m in self.mean],
                                                   std=[255.0 * s for s in self.std], is_hwc=False)]

    def stages(self, decode: bool = True) -> list[Stage]:
        """The op groups, each one ``map`` call."""
        raise NotImplementedError

    def operations(self, decode: bool = True) -> list:
        """Ops from an encoded image (``decode``) or a uint8 HWC array to a normalised CHW float32 image."""
        return [op for stage in self.stages(decode) for op in stage.ops]


class TrainTransform(_Normalised):
    """timm's training transform; ``operations(decode)`` gives the per-image MindSpore op list."""

    def __init__(self, image_size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = "bicubic", hflip: float = 0.5,
                 auto_augment: str | None = None, re_prob: float = 0.0, re_mode: str = "pixel",
                 re_count: int = 1, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        check_train_transform(image_size, scale, ratio, interpolation, hflip, auto_augment, re_prob, re_mode, re_count,
                              mean, std)
        super().__init__(mean, std)
        self.image_size = image_size
        self.scale, self.ratio = check_pair(scale, "scale"), check_pair(ratio, "ratio")
        self.interpolation = interpolation
        self.hflip = float(hflip)
        self.auto_augment = auto_augment or None
        self.erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count) if re_prob > 0 else None
        self._rand_augment = self._build_rand_augment() if self.auto_augment else None

    def _build_rand_augment(self) -> Any:
        from conformer.data.randaugment import rand_augment_transform  # only needed when augmenting

        hparams = {"translate_const": int(self.image_size * 0.45),
                   "img_mean": tuple(round(255 * m) for m in self.mean),
                   "interpolation": self.interpolation}
        return rand_augment_transform(self.auto_augment, hparams)

    def stages(self, decode: bool = True) -> list[Stage]:
        crop = vision.RandomCropDecodeResize if decode else vision.RandomResizedCrop
        geometry: list = [crop(self.image_size, scale=self.scale, ratio=self.ratio,
                               interpolation=_interpolation(self.interpolation))]
        if self.hflip > 0:
            geometry.append(vision.RandomHorizontalFlip(self.hflip))
        stages = [Stage(geometry)]
        if self._rand_augment is not None:
            stages.append(Stage([self._rand_augment], processes=True))
        erasing = [self.erasing] if self.erasing is not None else []
        return stages + [Stage(self._normalise_ops() + erasing)]

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"{self.interpolation}, hflip={self.hflip}, aa={self.auto_augment}, erasing={self.erasing})")


class EvalTransform(_Normalised):
    """Resize the shorter side to ``int(image_size / crop_pct)``, center crop ``image_size``, normalise (torchvision's
    sizes and offsets, see ``ResizeCenterCrop``)."""

    def __init__(self, image_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        check_eval_transform(image_size, crop_pct, interpolation, mean, std)
        super().__init__(mean, std)
        self.image_size = image_size
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop."""
        return int(self.image_size / self.crop_pct)

    def stages(self, decode: bool = True) -> list[Stage]:
        ops: list = [vision.Decode()] if decode else []
        ops.append(ResizeCenterCrop(self.resize_size, self.image_size, self.interpolation))
        return [Stage(ops + self._normalise_ops())]

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, crop_pct={self.crop_pct}, {self.interpolation})"
