"""Config checks that run before anything is built or compiled: one clear line per problem."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

TASKS = ("train", "eval", "export", "predict")
AMP_LEVELS = ("O0", "O1", "O2", "O3")
LOSS_SCALES = ("none", "static", "dynamic")


class ConfigError(ValueError):
    """The composed config cannot work; the message says which key and how to fix it."""


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # MissingMandatoryValue, interpolation errors
        raise ConfigError(f"{key}: {err}".splitlines()[0]) from err


def _number(cfg: DictConfig, key: str, ok: Callable[[float], bool], expect: str, integer: bool = False,
            optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r} must be {kind} ({expect})")
    if not ok(value):
        raise ConfigError(f"{key}={value!r} must be {expect}")


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(choices)}")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first impossible value (types, ranges, geometry)."""
    _choice(cfg, "task.name", TASKS)
    _number(cfg, "seed", lambda v: v >= 0, "a non-negative integer", integer=True)

    _number(cfg, "data.image_size", lambda v: v > 0, "a positive integer", integer=True)
    patch = _get(cfg, "model.patch_size") or 16
    size = _get(cfg, "data.image_size")
    if size % patch:
        nearest = max(patch, round(size / patch) * patch)
        raise ConfigError(f"data.image_size={size} must be a multiple of the patch size {patch} "
                          f"(model.patch_size), e.g. data.image_size={nearest}")
    _number(cfg, "data.batch_size", lambda v: v >= 1, "at least 1", integer=True)
    _number(cfg, "data.num_classes", lambda v: v >= 1, "at least 1, or null to infer it", integer=True,
            optional=True)
    _number(cfg, "model.depth", lambda v: v > 0 and v % 3 == 0, "a positive multiple of 3", integer=True)
    heads, dim = _get(cfg, "model.num_heads"), _get(cfg, "model.embed_dim")
    if not isinstance(heads, int) or not isinstance(dim, int) or heads <= 0 or dim % heads:
        raise ConfigError(f"model.embed_dim={dim} must be divisible by model.num_heads={heads}")
    _number(cfg, "model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)")

    for key in ("optim.schedule.base_lr", "optim.schedule.warmup_lr", "optim.schedule.min_lr"):
        _number(cfg, key, lambda v: v >= 0, "non-negative (a learning rate)")
    _number(cfg, "optim.schedule.base_lr", lambda v: v > 0, "positive (a learning rate)")
    _number(cfg, "optim.schedule.warmup_epochs", lambda v: v >= 0, "non-negative")
    _number(cfg, "optim.optimizer.weight_decay", lambda v: v >= 0, "non-negative")

    _number(cfg, "trainer.epochs", lambda v: v >= 1, "at least 1", integer=True)
    _number(cfg, "trainer.grad_accum_steps", lambda v: v >= 1, "at least 1", integer=True)
    _number(cfg, "trainer.clip_grad_norm", lambda v: v > 0, "positive, or null for no clipping", optional=True)
    _number(cfg, "trainer.log_every_n_steps", lambda v: v >= 1, "at least 1", integer=True)
    _choice(cfg, "trainer.loss_scale", LOSS_SCALES)
    _choice(cfg, "hardware.amp_level", AMP_LEVELS)
    warmup, epochs = _get(cfg, "optim.schedule.warmup_epochs"), _get(cfg, "trainer.epochs")
    if warmup >= epochs and epochs > 1:
        raise ConfigError(f"optim.schedule.warmup_epochs={warmup} must be below trainer.epochs={epochs}")
