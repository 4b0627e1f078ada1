"""The argument checks of the configurable components, runnable before MindSpore is imported.

Each component runs its check when it is built, and `validate_config` runs the same check on the component's
config node (found by `_target_` in `CHECKS`), so a bad value in any component is one `config error:` line in
under a second, before MindSpore, a run dir or a graph compile. Checks raise ValueError; the component's message
is the same whichever caller meets it. Components from modules without MindSpore keep their check next to them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from conformer.data.erasing import check_erasing
from conformer.data.mixup import check_mixup
from conformer.data.randaugment import parse_config
from conformer.data.sources import check_digits, check_image_folder, check_synthetic
from conformer.schedules import check_schedule

OPTIMIZERS = ("adamw", "sgd")
INTERPOLATION_NAMES = ("bicubic", "bilinear", "nearest")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}={value!r} must be a number")
    return float(value)


def check_label_smoothing(label_smoothing: Any) -> float:
    """DualHeadLoss: a smoothing in [0, 1)."""
    if not 0.0 <= _number(label_smoothing, "label_smoothing") < 1.0:
        raise ValueError(f"DualHeadLoss: label_smoothing must be in [0, 1), got {label_smoothing}.")
    return float(label_smoothing)


def check_loss(label_smoothing: Any = 0.0, **_: Any) -> None:
    check_label_smoothing(label_smoothing)


def check_adamw(betas: Sequence[Any], eps: Any) -> tuple[float, float]:
    """AdamW's two betas in [0, 1) (as plain floats: jit needs them so) and eps > 0."""
    betas = tuple(_number(beta, "betas") for beta in betas)
    if len(betas) != 2:
        raise ValueError(f"AdamW needs two betas (beta1, beta2), got {betas}.")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}.")
    if not _number(eps, "eps") > 0.0:
        raise ValueError(f"AdamW eps must be > 0, got {eps}.")
    return betas  # type: ignore[return-value]


def check_optimizer(name: Any = "adamw", lr: Any = None, weight_decay: Any = 0.05,
                    betas: Sequence[Any] = (0.9, 0.999), eps: Any = 1e-8, momentum: Any = 0.9, **_: Any) -> str:
    """build_optimizer's arguments (`lr` is the trainer's, None before it is known); the lower-case name."""
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of {OPTIMIZERS}.")
    if (lr is not None and not _number(lr, "lr") >= 0) or not _number(weight_decay, "weight_decay") >= 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}.")
    if name == "adamw":
        check_adamw(betas, eps)
    elif not _number(momentum, "momentum") >= 0:
        raise ValueError(f"SGD momentum must be >= 0, got {momentum}.")
    return name


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


def check_ema_decay(decay: Any) -> float:
    if not 0.0 <= _number(decay, "decay") <= 1.0:
        raise ValueError(f"ModelEma: decay must be in [0, 1], got {decay}.")
    return float(decay)


def check_trainer(ema_decay: Any = None, **_: Any) -> None:
    """The Trainer's own arguments beyond `validate_config`'s integers and choices."""
    if ema_decay:
        check_ema_decay(ema_decay)


# The check of each component, by the `_target_` that builds it.
CHECKS: dict[str, Callable[..., Any]] = {
    "conformer.losses.DualHeadLoss": check_loss,
    "conformer.train.trainer.Trainer": check_trainer,
    "conformer.optim.build_optimizer": check_optimizer,
    "conformer.schedules.WarmupCosineSchedule": check_schedule,
    "conformer.data.module.DataModule": check_data_module,
    "conformer.data.transforms.TrainTransform": check_train_transform,
    "conformer.data.transforms.EvalTransform": check_eval_transform,
    "conformer.data.mixup.Mixup": check_mixup,
    "conformer.data.sources.DigitsSource": check_digits,
    "conformer.data.sources.ImageFolderSource": check_image_folder,
    "conformer.data.sources.SyntheticSource": check_synthetic,
}
