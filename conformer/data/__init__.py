"""Data pipeline: sources, transforms, Mixup/CutMix, random erasing, sharding samplers and the DataModule.

Names are imported lazily so that ``conformer.data.folders`` (sources only) loads without MindSpore.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DigitsSource": "folders",
    "ImageFolderSource": "folders",
    "Source": "folders",
    "SyntheticSource": "folders",
    "write_image_folder": "folders",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "EvalTransform": "transforms",
    "TrainTransform": "transforms",
    "RandomErasing": "erasing",
    "Mixup": "mixup",
    "ShardSampler": "sampler",
    "eval_shard": "sampler",
    "repeated_aug_shard": "sampler",
    "train_shard": "sampler",
    "DataModule": "module",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
