"""Data sources: an ImageNet-style folder tree, scikit-learn's digits materialised as one, synthetic images.

Every source exposes ``classes``, ``num_classes``, ``train_samples`` / ``val_samples`` (``(path, label)``
pairs), ``train_size`` / ``val_size``, ``encoded`` (whether its reader yields encoded file bytes that the
transforms must decode) and ``reader(split)``: a random-access object for ``GeneratorDataset`` yielding
``(image, label)`` with ``label`` an int32 scalar array.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conformer.validation import IMAGE_EXTENSIONS

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DigitsSource",
    "FileReader",
    "ImageFolderSource",
    "Source",
    "SyntheticSource",
    "scan_split",
    "write_image_folder",
]

SPLITS = ("train", "val")
Sample = tuple[str, int]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder``: recursive, sorted, hidden entries skipped, extension case-insensitive."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def scan_split(split_dir: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Scan ``split_dir/<class>/**/<image>``; return the class list and the ``(path, label)`` samples.

    With ``classes`` given (the train classes), labels index into it and any other class folder is an error.
    """
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<images>")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has classes that the train split lacks: {unknown}; every val class "
                         "needs a train folder of the same name (rename or remove these folders)")
    index = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    empty: list[str] = []
    for name in found:
        files = _image_files(split_dir / name)
        if not files:
            empty.append(name)
        samples.extend((path, index[name]) for path in files)
    if empty:
        more = " ..." if len(empty) > 10 else ""
        kinds = "/".join(IMAGE_EXTENSIONS)
        raise FileNotFoundError(f"class folders without images ({kinds}) in {split_dir}: {empty[:10]}{more}; "
                                "add images or remove these folders")
    return list(classes), samples


class FileReader:
    """Random access to ``(encoded bytes as a uint8 array, int32 label)`` for GeneratorDataset."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, label = self.samples[index]
        return np.fromfile(path, dtype=np.uint8), np.array(label, dtype=np.int32)


class Source:
    """What every source shares: class names, ``(path, label)`` samples per split, sizes."""

    encoded: bool = True
    classes: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_samples)

    @property
    def val_size(self) -> int:
        return len(self.val_samples)

    def samples(self, split: str) -> list[Sample]:
        """The ``(path, label)`` list of ``split`` ('train' or 'val')."""
        return self.train_samples if _check_split(split) == "train" else self.val_samples

    def reader(self, split: str) -> FileReader:
        """Random-access ``(image, int32 label)`` reader of ``split`` for ``GeneratorDataset``."""
        return FileReader(self.samples(split))

    def __repr__(self) -> str:
        sizes = f"train={self.train_size}, val={self.val_size}"
        return f"{type(self).__name__}(classes={self.num_classes}, {sizes})"


class ImageFolderSource(Source):
    """ImageNet layout: ``root/<train_dir>/<class>/*.JPEG`` and ``root/<val_dir>/<class>/*.JPEG``.

    Classes are the sorted subfolder names of the train split; a label is the position in that list.
    """

    def __init__(self, root: str | os.PathLike, train_dir: str = "train", val_dir: str = "val") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder: set "
                                    f"data.source.root to a folder holding {train_dir}/<class>/<images> and "
                                    f"{val_dir}/<class>/<images>")
        dirs = {"train": self.root / train_dir, "val": self.root / val_dir}
        for split, path in dirs.items():
            if not path.is_dir():
                raise FileNotFoundError(f"{split} split folder {path} is missing: create it with one "
                                        f"subfolder per class, or set {split}_dir to the right subfolder "
                                        f"of {self.root}")
        self.classes, self.train_samples = scan_split(dirs["train"])
        _, self.val_samples = scan_split(dirs["val"], self.classes)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, root={str(self.root)!r})"


DIGITS_MANIFEST = "digits.json"


class DigitsSource(ImageFolderSource):
    """scikit-learn's ``load_digits`` (1,797 real 8x8 images, 10 classes) as an ImageFolder tree of PNGs.

    The tree is written once under ``root`` (stratified train/val split with a fixed seed), atomically: it is
    built in a sibling temp folder and renamed into place, so a concurrent process either wins the rename or
    finds the finished tree. Pixel values 0..16 are scaled to 0..255; images stay 8x8 (transforms upscale).
    """

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.2")
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


class SyntheticSource(Source):
    """Random images and labels for benchmarks; they go through the same transforms, minus decoding."""

    encoded = False

    def __init__(self, num_train: int = 256, num_val: int = 64, num_classes: int = 10, seed: int = 0,
                 height: int = 256, width: int = 256) -> None:
        sizes = {"num_train": num_train, "num_val": num_val, "num_classes": num_classes, "height": height,
                 "width": width}
        for name, value in sizes.items():
            if int(value) <= 0:
                raise ValueError(f"SyntheticSource {name}={value} must be a positive integer")
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
        return SyntheticReader(self._labels[_check_split(split)], self.height, self.width, self.seed,
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
