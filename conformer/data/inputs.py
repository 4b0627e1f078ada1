"""The image files `task=predict` reads and the class names it prints: found and checked before any build."""
from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from conformer.errors import ConfigError
from conformer.vocabulary import IMAGE_EXTENSIONS


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_inputs(inputs: str | Sequence[str] | None) -> list[Path]:
    """Image files named by `task.inputs`: files, folders (recursive) or globs, in order, without duplicates."""
    if not inputs:
        raise ConfigError("task.inputs is required: an image file, a folder or a glob, e.g. "
                          "task.inputs=photos/cat.jpg or task.inputs='photos/**/*.png'")
    if isinstance(inputs, ListConfig):
        inputs = OmegaConf.to_container(inputs)
    specs = [inputs] if isinstance(inputs, str) else [str(spec) for spec in inputs]
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image(p))
        else:
            files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image(p))
        if not files:
            kind = "folder" if path.is_dir() else "glob" if glob.has_magic(spec) else "path"
            raise ConfigError(f"task.inputs: the {kind} {spec!r} matches no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); check the path (relative to {Path.cwd()})")
        found.update(dict.fromkeys(files))
    return list(found)


def class_names_file(spec: str) -> list[str]:
    """The class names of `task.classes`: a text file, one name per line."""
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.classes={spec}: no such file (one class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"task.classes={path} holds no class names (one per line)")
    return names


def check_class_count(names: int, num_classes: int, origin: str) -> None:
    """Class names must match the weights' classifier."""
    if names != num_classes:
        raise ConfigError(f"the weights have {num_classes} classes but {names} class names came from {origin}: "
                          "choose the data config the weights were trained on, or set task.classes=<file with one "
                          "name per line>")


