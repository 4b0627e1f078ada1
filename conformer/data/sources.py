"""Data sources: an ImageNet-style folder tree, scikit-learn's digits materialised as one, synthetic images.

Every source exposes ``classes``, ``num_classes``, ``train_samples`` / ``val_samples`` (``(path, label)``
pairs), ``train_size`` / ``val_size``, ``encoded`` (whether its reader yields encoded file bytes that the
transforms must decode) and ``reader(split)``: a random-access object for ``GeneratorDataset`` yielding
``(image, label)`` with ``label`` an int32 scalar array. ``CheckedReader`` wraps an encoded reader so that a
corrupt or truncated file is skipped (or raised) by name before MindSpore's decoder meets it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conformer.validation import BAD_IMAGE_POLICIES, IMAGE_EXTENSIONS, require_choice

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "BadImageError",
    "CheckedReader",
    "DigitsSource",
    "FileReader",
    "ImageFolderSource",
    "Source",
    "SyntheticSource",
    "file_problem",
    "image_problem",
    "scan_split",
    "write_image_folder",
]

SPLITS = ("train", "val")
Sample = tuple[str, int]
log = logging.getLogger(__name__)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder``: recursive (following links to folders), sorted, hidden entries skipped,
    extension case-insensitive. Each folder and each file counts once: a link back up the tree (a loop, e.g.
    ``up -> ..``) or to a folder or file already found is skipped, with one warning naming the links."""
    found: list[str] = []
    root = os.stat(folder)
    seen_dirs = {(root.st_dev, root.st_ino)}
    seen_files: set[tuple[int, int]] = set()
    skipped: list[str] = []
    pending = [str(folder)]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            log.warning("cannot list %s (%s): its images are left out", directory, err.strerror or err)
            continue
        here = os.path.realpath(directory)
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                if not is_dir and not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                info = entry.stat()
            except OSError:  # a dangling link
                continue
            key = (info.st_dev, info.st_ino)
            if is_dir:
                target = os.path.realpath(entry.path) if entry.is_symlink() else None
                if key in seen_dirs or (target and (here + os.sep).startswith(target.rstrip(os.sep) + os.sep)):
                    skipped.append(f"{entry.path} -> {target or entry.path}")
                    continue
                seen_dirs.add(key)
                subdirs.append(entry.path)
            elif key in seen_files:  # a link to an image already found (or the image a link found first)
                skipped.append(f"{entry.path} -> {os.path.realpath(entry.path)}")
            else:
                seen_files.add(key)
                found.append(entry.path)
        pending.extend(reversed(subdirs))  # depth first, in name order (as os.walk)
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("%s: skipped %d links back up the tree (a loop) or to folders or files already scanned, so that "
                    "each image counts once: %s%s", folder, len(skipped), "; ".join(skipped[:5]), more)
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


def image_problem(data: bytes | np.ndarray) -> str | None:
    """Why encoded image bytes cannot be decoded (e.g. ``'OSError: image file is truncated ...'``), or None.

    PIL decodes the whole file, a JPEG at 1/8 scale: libjpeg's DCT scaling still entropy-decodes every byte, so
    truncated and corrupt files fail as in a full decode, at a fraction of its cost.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft(None, (1, 1))  # JPEG only; other formats ignore it
            image.load()
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        return "not an image (unknown format or corrupt header)"
    except Exception as err:  # PIL raises many types for broken files; all mean "cannot decode"
        return f"{type(err).__name__}: {err}"
    return None


def _unreadable(err: OSError) -> str:
    return f"cannot read the file: {type(err).__name__}: {err}"


def file_problem(path: str | os.PathLike) -> str | None:
    """Why an image file cannot be read or decoded (``image_problem``), or None."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return _unreadable(err)
    return image_problem(data)


class BadImageError(ValueError):
    """An image file that cannot be decoded, under ``data.on_bad_image=error`` (or none at all in a split)."""


UNCHECKED, GOOD, BAD = 0, 1, 2


class CheckedReader:
    """An encoded-image reader that decodes each file once in Python (``image_problem``) before MindSpore does.

    MindSpore's decoder fails (or crashes the process) on a bad file inside a C++ worker thread, naming nothing.
    Here a file that cannot be read or decoded is remembered as bad and never read again; good files are checked
    in their first epoch only. ``on_bad_image='skip'``: a bad file is logged once (a warning naming it and the
    reason) and its sample is replaced by the next good one of the split (index + 1, + 2, ..., wrapping): the
    same replacement in every epoch and run, so batch shapes and step counts stay as they are.
    ``'error'``: ``BadImageError`` naming the file and the reason. ``reader``: any random-access reader of
    ``(encoded bytes, label)`` for ``samples``, e.g. ``FileReader``. Thread-safe.
    """

    def __init__(self, reader: Any, samples: Sequence[Sample], on_bad_image: str = "skip",
                 split: str = "train") -> None:
        self.reader, self.samples, self.split = reader, list(samples), split
        self.on_bad_image = require_choice(on_bad_image, "data.on_bad_image", BAD_IMAGE_POLICIES)
        if len(reader) != len(self.samples):
            raise ValueError(f"the reader has {len(reader)} samples but the {split} split {len(self.samples)}")
        self._status = np.full(len(self.samples), UNCHECKED, np.int8)
        self._bad: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def bad_images(self) -> dict[str, str]:
        """Path -> reason of every distinct bad file met so far."""
        with self._lock:
            return dict(self._bad)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        size = len(self.samples)
        for step in range(size):
            candidate = (int(index) + step) % size
            sample = self._good_sample(candidate)
            if sample is not None:
                return sample
            if self.on_bad_image == "error":
                raise BadImageError(f"{self._describe(candidate)}; set data.on_bad_image=skip to skip bad "
                                    "files (a warning names each)")
        raise BadImageError(f"none of the {size} images of the {self.split} split can be decoded, e.g. "
                            f"{self._describe(int(index))}")

    def _good_sample(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The reader's sample, or None for a bad file (read and checked once, then remembered)."""
        if self._status[index] == BAD:
            return None
        try:
            image, label = self.reader[index]
        except OSError as err:  # vanished, unreadable: as bad as a corrupt file
            problem = _unreadable(err)
        else:
            problem = image_problem(image) if self._status[index] == UNCHECKED else None
        if problem is None:
            self._status[index] = GOOD
            return image, label
        self._mark_bad(index, problem)
        return None

    def _mark_bad(self, index: int, problem: str) -> None:
        path = self.samples[index][0]
        with self._lock:  # two threads may meet the same file: one warning
            first = path not in self._bad
            self._bad[path] = problem
            self._status[index] = BAD
        if first and self.on_bad_image == "skip":
            log.warning("skipping bad image %s (%s): the next good image of the %s split takes its place",
                        path, problem, self.split)

    def _describe(self, index: int) -> str:
        path = self.samples[index][0]
        return f"cannot decode image {path}: {self._bad.get(path, 'bad file')}"


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


def check_image_folder(root: str | os.PathLike, train_dir: str = "train", val_dir: str = "val",
                       **_: Any) -> dict[str, Path]:
    """ImageFolderSource's folders exist (their contents are scanned when it is built); the split folders."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder: set data.source.root to "
                                f"a folder holding {train_dir}/<class>/<images> and {val_dir}/<class>/<images>")
    dirs = {"train": root / train_dir, "val": root / val_dir}
    for split, path in dirs.items():
        if not path.is_dir():
            raise FileNotFoundError(f"{split} split folder {path} is missing: create it with one subfolder per "
                                    f"class, or set {split}_dir to the right subfolder of {root}")
    return dirs


class ImageFolderSource(Source):
    """ImageNet layout: ``root/<train_dir>/<class>/*.JPEG`` and ``root/<val_dir>/<class>/*.JPEG``.

    Classes are the sorted subfolder names of the train split; a label is the position in that list.
    """

    def __init__(self, root: str | os.PathLike, train_dir: str = "train", val_dir: str = "val") -> None:
        self.root = Path(root).expanduser()
        dirs = check_image_folder(root, train_dir, val_dir)
        self.classes, self.train_samples = scan_split(dirs["train"])
        _, self.val_samples = scan_split(dirs["val"], self.classes)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, root={str(self.root)!r})"


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
