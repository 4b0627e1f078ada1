"""Sources whose images the project makes itself: scikit-learn's 8x8 digits written once as an ImageFolder (the
embedded default), random images for benchmarks and tests, and `write_image_folder` for test datasets."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from conformer.data.sources import SPLITS, ImageFolderSource, Source, check_split
from conformer.vocabulary import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

DIGITS_MANIFEST = "digits.json"


def check_digits(val_fraction: float = 0.2, **_: Any) -> None:
    """DigitsSource's arguments."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.2")


class DigitsSource(ImageFolderSource):
    """scikit-learn's ``load_digits`` (1,797 real 8x8 images, 10 classes) as an ImageFolder tree of PNGs.

    The tree is written once under ``root`` (stratified train/val split with a fixed seed), atomically: it is
    built in a sibling temp folder and renamed into place, so a concurrent process either wins the rename or
    finds the finished tree. Pixel values 0..16 are scaled to 0..255; images stay 8x8 (transforms upscale).
    """

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> None:
        check_digits(val_fraction)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        root = Path(root).expanduser()
        self._materialise(root)
        super().__init__(root)

    def _manifest(self) -> dict:
        return {"source": "sklearn.datasets.load_digits", "val_fraction": self.val_fraction,
                "seed": self.seed}

    def _materialise(self, root: Path) -> None:
        if not self._is_complete(root):
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
            try:
                self._write_tree(tmp)
                try:
                    os.rename(tmp, root)  # atomic; fails when another process renamed its tree there first
                except OSError:
                    if not self._is_complete(root):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        found = json.loads((root / DIGITS_MANIFEST).read_text())
        if found != self._manifest():
            raise ValueError(f"{root} holds digits written with {found}, not {self._manifest()}: "
                             f"delete {root} or choose another data.source.root")

    @staticmethod
    def _is_complete(root: Path) -> bool:
        if (root / DIGITS_MANIFEST).is_file():
            return True
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root} exists but is not a digits tree (no {DIGITS_MANIFEST}): "
                                  "delete it or choose another data.source.root")
        return False

    def _write_tree(self, target: Path) -> None:
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train_idx, val_idx = train_test_split(np.arange(len(pixels)), test_size=self.val_fraction,
                                              random_state=self.seed, stratify=digits.target)
        for split, chosen in (("train", train_idx), ("val", val_idx)):
            for label in range(10):
                (target / split / str(label)).mkdir(parents=True, exist_ok=True)
            for i in sorted(chosen.tolist()):
                Image.fromarray(pixels[i]).save(target / split / str(digits.target[i]) / f"{i:04d}.png")
        (target / DIGITS_MANIFEST).write_text(json.dumps(self._manifest()))


class SyntheticReader:
    """Random uint8 HWC images made on the fly from ``(seed, split, index)``: reproducible, nothing stored."""

    def __init__(self, labels: np.ndarray, height: int, width: int, seed: int, split_id: int) -> None:
        self.labels, self.shape, self.seed, self.split_id = labels, (height, width, 3), seed, split_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, int(index)])
        image = rng.integers(0, 256, size=self.shape, dtype=np.uint8)
        return image, np.array(self.labels[index], dtype=np.int32)


def check_synthetic(num_train: int = 256, num_val: int = 64, num_classes: int = 10, height: int = 256,
                    width: int = 256, **_: Any) -> None:
    """SyntheticSource's sizes."""
    sizes = {"num_train": num_train, "num_val": num_val, "num_classes": num_classes, "height": height,
             "width": width}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"SyntheticSource {name}={value} must be a positive integer")


class SyntheticSource(Source):
    """Random images and labels for benchmarks; they go through the same transforms, minus decoding."""

    encoded = False

    def __init__(self, num_train: int = 256, num_val: int = 64, num_classes: int = 10, seed: int = 0,
                 height: int = 256, width: int = 256) -> None:
        check_synthetic(num_train, num_val, num_classes, height, width)
        self.seed, self.height, self.width = int(seed), int(height), int(width)
        self.classes = [f"class_{i:04d}" for i in range(int(num_classes))]
        rng = np.random.default_rng(self.seed)
        self._labels = {split: rng.integers(0, num_classes, size=int(n))
                        for split, n in zip(SPLITS, (num_train, num_val))}
        # pseudo-paths keep the (path, label) contract of the file sources
        self.train_samples, self.val_samples = (
            [(f"synthetic://{split}/{i}", int(y)) for i, y in enumerate(self._labels[split])]
            for split in SPLITS)

    def reader(self, split: str) -> SyntheticReader:
        return SyntheticReader(self._labels[check_split(split)], self.height, self.width, self.seed,
                               SPLITS.index(split))

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, image={self.height}x{self.width})"


def write_image_folder(root: str | os.PathLike, num_classes: int = 3, train_per_class: int = 4,
                       val_per_class: int = 2, size: tuple[int, int] = (48, 40), ext: str = ".jpg",
                       noise: float = 8.0, seed: int = 0) -> Path:
    """Write an ImageFolder tree of smooth random RGB images (``size``: width, height), for tests/benchmarks.

    Classes are ``class_00``, ``class_01``, ...; returns ``root``.
    """
    from PIL import Image

    if ext.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"ext={ext!r} is not an image extension: use one of {list(IMAGE_EXTENSIONS)}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    width, height = size
    coarse_shape = (max(2, height // 32), max(2, width // 32), 3)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, size=coarse_shape, dtype=np.uint8))
                smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
                pixels = np.clip(smooth + rng.normal(0.0, noise, smooth.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{label:02d}_{i:04d}{ext}")
    return root
