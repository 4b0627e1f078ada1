"""Random erasing (Zhong et al. 2017) with timm's semantics, on normalised CHW float32 images.

With probability ``probability`` an image gets ``count`` boxes (``count`` uniform in
``[min_count, max_count]``), each of area ``uniform(min_area, max_area) * H * W / count`` and aspect ratio
log-uniform in ``[min_aspect, max_aspect]``; a box that does not fit is redrawn (10 attempts) then skipped.
The box is filled with zeros (``const``), one normal value per channel (``rand``) or per pixel (``pixel``);
zero is the dataset mean after normalisation. Every draw derives from Python's ``random`` module, which
MindSpore seeds in its workers.
"""
from __future__ import annotations

import math
import random

import numpy as np

__all__ = ["ERASE_MODES", "RandomErasing"]

ERASE_MODES = ("const", "rand", "pixel")
_ATTEMPTS = 10


def check_erasing(probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                  min_aspect: float = 0.3, max_aspect: float | None = None, mode: str = "pixel",
                  min_count: int = 1, max_count: int | None = None) -> tuple[float, int]:
    """RandomErasing's arguments; returns the effective (max_aspect, max_count)."""
    max_aspect = max_aspect or 1.0 / min_aspect
    max_count = max_count or min_count
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random erasing probability={probability} must be in [0, 1]")
    if not 0.0 < min_area <= max_area <= 1.0:
        raise ValueError(f"random erasing areas ({min_area}, {max_area}) need 0 < min <= max <= 1")
    if not 0.0 < min_aspect <= max_aspect:
        raise ValueError(f"random erasing aspect ratios ({min_aspect}, {max_aspect}) need 0 < min <= max")
    if mode not in ERASE_MODES:
        raise ValueError(f"random erasing mode={mode!r} is unknown: use one of {list(ERASE_MODES)}")
    if not 1 <= min_count <= max_count:
        raise ValueError(f"random erasing counts ({min_count}, {max_count}) need 1 <= min <= max")
    return max_aspect, max_count


class RandomErasing:
    """Erase random boxes of a CHW float image (after normalisation), as timm's ``RandomErasing``."""

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, mode: str = "pixel",
                 min_count: int = 1, max_count: int | None = None) -> None:
        max_aspect, max_count = check_erasing(probability, min_area, max_area, min_aspect, max_aspect, mode,
                                              min_count, max_count)
        self.probability, self.min_area, self.max_area = float(probability), float(min_area), float(max_area)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.mode, self.min_count, self.max_count = mode, int(min_count), int(max_count)

    def _fill(self, channels: int, height: int, width: int) -> np.ndarray:
        if self.mode == "const":
            return np.zeros((channels, 1, 1), np.float32)
        rng = np.random.default_rng(random.getrandbits(64))
        shape = (channels, height, width) if self.mode == "pixel" else (channels, 1, 1)
        return rng.standard_normal(shape, dtype=np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3:
            raise ValueError(f"RandomErasing expects one CHW image, got shape {image.shape}")
        if random.random() >= self.probability:
            return image
        out = np.array(image, dtype=np.float32, copy=True)
        channels, height, width = out.shape
        count = random.randint(self.min_count, self.max_count)
        for _ in range(count):
            for _ in range(_ATTEMPTS):
                area = random.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h < height and 0 < w < width:
                    top = random.randint(0, height - h)
                    left = random.randint(0, width - w)
                    out[:, top:top + h, left:left + w] = self._fill(channels, h, w)
                    break
        return out

    def __repr__(self) -> str:
        return (f"RandomErasing(p={self.probability}, area=({self.min_area}, {self.max_area}), "
                f"mode={self.mode}, count=({self.min_count}, {self.max_count}))")
