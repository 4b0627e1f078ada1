"""The arguments of the data components (transforms, the DataModule), checked without MindSpore: each component
runs its check when built, and `validate_config` runs it on the config node before anything is built."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from conformer.checks import number as _number
from conformer.data.erasing import check_erasing
from conformer.data.randaugment import parse_config

INTERPOLATION_NAMES = ("bicubic", "bilinear", "nearest")


def check_interpolation(name: Any) -> str:
    if name not in INTERPOLATION_NAMES:
        raise ValueError(f"interpolation={name!r} is not supported: use one of {sorted(INTERPOLATION_NAMES)}")
    return name


def check_triple(values: Sequence[Any], name: str) -> tuple[float, float, float]:
    values = tuple(_number(v, name) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name}={values} must hold 3 per-channel values (RGB)")
    return values  # type: ignore[return-value]


def check_pair(values: Sequence[Any], name: str) -> tuple[float, float]:
    values = tuple(_number(v, name) for v in values)
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name}={values} must be a (min, max) pair with 0 < min <= max")
    return values  # type: ignore[return-value]


def check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be an integer >= 1 (e.g. 224)")
    return image_size


def check_normalisation(mean: Sequence[Any], std: Sequence[Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = check_triple(mean, "mean"), check_triple(std, "std")
    if min(std) <= 0:
        raise ValueError(f"std={std} must be positive")
    return mean, std


def _probability(value: Any, name: str, hint: str = "") -> float:
    if not 0.0 <= _number(value, name) <= 1.0:
        raise ValueError(f"{name}={value} is a probability: use a value in [0, 1]{hint}")
    return float(value)


def check_train_transform(image_size: Any, scale: Sequence[Any] = (0.08, 1.0), ratio: Sequence[Any] = (0.75, 4 / 3),
                          interpolation: Any = "bicubic", hflip: Any = 0.5, auto_augment: Any = None,
                          re_prob: Any = 0.0, re_mode: Any = "pixel", re_count: Any = 1,
                          mean: Sequence[Any] = (0.485, 0.456, 0.406), std: Sequence[Any] = (0.229, 0.224, 0.225),
                          **_: Any) -> None:
    """TrainTransform: sizes, crop ranges, probabilities, the RandAugment spec and the erasing settings."""
    check_normalisation(mean, std)
    check_image_size(image_size)
    scale = check_pair(scale, "scale")
    check_pair(ratio, "ratio")
    if scale[1] > 1.0:
        raise ValueError(f"scale={scale} is a fraction of the image area: max must be <= 1")
    check_interpolation(interpolation)
    _probability(hflip, "hflip")
    _probability(re_prob, "re_prob", " (0: no erasing)")
    if re_prob:
        check_erasing(re_prob, mode=re_mode, max_count=re_count)
    if auto_augment:
        if not str(auto_augment).startswith("rand"):
            raise ValueError(f"auto_augment={auto_augment!r}: only RandAugment specs are supported "
                             "(e.g. 'rand-m9-mstd0.5-inc1'); use null to disable")
        parse_config(str(auto_augment))


def check_eval_transform(image_size: Any, crop_pct: Any = 0.875, interpolation: Any = "bicubic",
                         mean: Sequence[Any] = (0.485, 0.456, 0.406), std: Sequence[Any] = (0.229, 0.224, 0.225),
                         **_: Any) -> None:
    check_normalisation(mean, std)
    check_image_size(image_size)
    if not 0.0 < _number(crop_pct, "crop_pct") <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1] (0.875 is the ImageNet convention)")
    check_interpolation(interpolation)


def check_transform_size(kind: str, transform_size: Any, image_size: Any) -> None:
    """A DataModule's transforms crop to its image size."""
    if transform_size != image_size:
        raise ValueError(f"data.{kind}.image_size={transform_size} differs from data.image_size={image_size}: "
                         "set it to ${data.image_size}")


def check_mixup_batches(batch_size: int, drop_last: bool) -> None:
    if batch_size % 2 or not drop_last:
        raise ValueError(f"Mixup/CutMix in batch mode needs full even batches: got batch_size={batch_size}, "
                         f"drop_last={drop_last}; use an even batch size and drop_last=true, or data.mixup=null")


def check_data_module(image_size: Any = None, batch_size: Any = 1, train_transform: Any = None,
                      eval_transform: Any = None, mixup: Any = None, drop_last: Any = True, **_: Any) -> None:
    """The DataModule's cross-checks on config nodes (its integers are `validate_config`'s)."""
    for kind, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
        if isinstance(transform, Mapping) and "image_size" in transform:
            check_transform_size(kind, transform["image_size"], image_size)
    if mixup is not None and isinstance(batch_size, int):
        check_mixup_batches(batch_size, bool(drop_last))
