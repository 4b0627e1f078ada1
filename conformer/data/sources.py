"""Data sources: an ImageNet-style folder tree, scikit-learn's digits materialised as one, synthetic images.

Every source exposes ``classes``, ``num_classes``, ``train_samples`` / ``val_samples`` (``(path, label)``
pairs), ``train_size`` / ``val_size``, ``encoded`` (whether its reader yields encoded file bytes that the
transforms must decode) and ``reader(split)``: a random-access object for ``GeneratorDataset`` yielding
``(image, label)`` with ``label`` an int32 scalar array. ``CheckedReader`` wraps an encoded reader so that a
corrupt or truncated file is skipped (or raised) by name before MindSpore's decoder meets it.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conformer.checks import require_choice
from conformer.vocabulary import BAD_IMAGE_POLICIES, IMAGE_EXTENSIONS

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "BadImageError",
    "CheckedReader",
    "FileReader",
    "ImageFolderSource",
    "Source",
    "file_problem",
    "image_problem",
    "scan_split",
]

SPLITS = ("train", "val")
Sample = tuple[str, int]
log = logging.getLogger(__name__)


def check_split(split: str) -> str:
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
        return self.train_samples if check_split(split) == "train" else self.val_samples

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
