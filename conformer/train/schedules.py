"""Warmup + cosine learning-rate schedule, stepped per iteration or per epoch, and batch-size lr scaling."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

LR_SCALING_MODES = ("none", "linear")
INTERVALS = ("step", "epoch")


def scale_lr(base_lr: float, global_batch: int | None, reference_batch: int, mode: str = "none") -> float:
    """The lr at `global_batch`: `base_lr` ("none") or base_lr * global_batch / reference_batch ("linear").

    `global_batch` may be None only for "none".
    """
    if mode not in LR_SCALING_MODES:
        raise ValueError(f"lr scaling mode {mode!r} is unknown; choose one of {LR_SCALING_MODES}.")
    if global_batch is None and mode == "linear":
        raise ValueError("lr scaling 'linear' needs the global batch size: pass global_batch (per-device batch "
                         "x devices x gradient accumulation steps).")
    if (global_batch is not None and global_batch < 1) or reference_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got global_batch={global_batch}, "
                         f"reference_batch={reference_batch}.")
    if mode == "linear":
        return base_lr * global_batch / reference_batch
    return base_lr


def check_schedule(base_lr: float, warmup_lr: float, min_lr: float, warmup_epochs: float, epochs: int | None = None,
                   steps_per_epoch: int | None = None, global_batch: int | None = None, lr_scaling: str = "none",
                   reference_batch_size: int = 1024, interval: str = "step", **_: Any) -> float:
    """WarmupCosineSchedule's arguments (`epochs` and `steps_per_epoch`, which the trainer supplies, are checked
    when given); returns the base lr scaled to the global batch."""
    for name, value in (("base_lr", base_lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr),
                        ("warmup_epochs", warmup_epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"WarmupCosineSchedule: {name} must be a finite number >= 0, got {value}.")
    if base_lr <= 0:
        raise ValueError(f"WarmupCosineSchedule: base_lr must be > 0 (a learning rate), got {base_lr}.")
    if interval not in INTERVALS:
        raise ValueError(f"WarmupCosineSchedule: interval {interval!r} is unknown; choose one of {INTERVALS}.")
    known = [n for n in (epochs, steps_per_epoch) if n is not None]
    if not all(int(n) == n and n >= 1 for n in known):
        raise ValueError(f"WarmupCosineSchedule: epochs and steps_per_epoch must be integers >= 1, got "
                         f"epochs={epochs}, steps_per_epoch={steps_per_epoch}.")
    if epochs is not None and warmup_epochs >= epochs:
        raise ValueError(f"WarmupCosineSchedule: warmup_epochs ({warmup_epochs}) must be smaller than "
                         f"epochs ({epochs}); lower warmup_epochs or train longer.")
    scaled = float(scale_lr(base_lr, global_batch, reference_batch_size, lr_scaling))
    if min_lr > scaled:
        how = "" if scaled == base_lr else f", scaled from {base_lr} by {lr_scaling}"
        raise ValueError(f"WarmupCosineSchedule: min_lr ({min_lr}) must not exceed base_lr ({scaled}{how}).")
    return scaled


def fitting_warmup(warmup_epochs: float, epochs: int) -> float:
    """The warmup a run of `epochs` trains with: the configured one; none for a one-epoch run (a smoke test may keep
    the recipe's warmup). A ValueError naming both keys when a longer run cannot fit it."""
    if warmup_epochs < epochs:
        return warmup_epochs
    if epochs <= 1:
        return 0.0
    raise ValueError(f"optim.schedule.warmup_epochs={warmup_epochs} must be below trainer.epochs={epochs}: set "
                     f"optim.schedule.warmup_epochs={max(0, epochs - 1) if epochs <= 5 else 5} or train longer")


class WarmupCosineSchedule:
    """Linear warmup from `warmup_lr` to `base_lr`, then cosine decay towards `min_lr`.

    `base_lr` is first scaled to the global batch: with `lr_scaling="linear"` it becomes
    base_lr * global_batch / reference_batch_size (`warmup_lr` and `min_lr` are not scaled). `self.base_lr` is the
    lr in use, `self.configured_base_lr` the configured one.

    There are `epochs * steps_per_epoch` optimizer updates; `values()` has one lr per update and `schedule(step)`
    is the lr of update `step`, whatever the interval:

    - ``interval="step"``: the lr changes every update. The first `round(warmup_epochs * steps_per_epoch)` steps
      warm up (step 0 is `warmup_lr`, the first cosine step `base_lr`); the cosine reaches `min_lr` at the last
      step. Steps past the end return `min_lr`.
    - ``interval="epoch"``: the official Conformer / DeiT recipe, timm's ``CosineLRScheduler`` (timm 0.3-0.4,
      built by ``create_scheduler`` with ``t_initial=epochs``, ``warmup_t=warmup_epochs``, no cycles nor noise),
      stepped with ``step(epoch)`` at the end of each epoch. Its value at epoch t is
      ``warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs`` while t < warmup_epochs, then
      ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / epochs)) / 2`` (the cosine counts from epoch 0, not from
      the end of the warmup, so it starts just below `base_lr`), and `min_lr` from t = epochs on (`epoch_lr`).
      Because the scheduler is stepped after the epoch, epoch e trains at the value of epoch e - 1, and epoch 0
      at the value of epoch 0; the lr is constant within an epoch.
    """

    def __init__(self, base_lr: float, warmup_lr: float, min_lr: float, warmup_epochs: float, epochs: int,
                 steps_per_epoch: int, global_batch: int | None = None, lr_scaling: str = "none",
                 reference_batch_size: int = 1024, interval: str = "step") -> None:
        self.configured_base_lr = float(base_lr)
        self.base_lr = check_schedule(base_lr, warmup_lr, min_lr, warmup_epochs, epochs, steps_per_epoch,
                                      global_batch, lr_scaling, reference_batch_size, interval)
        self.warmup_lr, self.min_lr = float(warmup_lr), float(min_lr)
        self.global_batch, self.lr_scaling, self.reference_batch_size = global_batch, lr_scaling, reference_batch_size
        self.interval, self.warmup_epochs = interval, float(warmup_epochs)
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    def __len__(self) -> int:
        return self.total_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"WarmupCosineSchedule: step must be >= 0, got {step}.")
        if self.interval == "epoch":
            return self.epoch_lr(max(step // self.steps_per_epoch - 1, 0))
        if step < self.warmup_steps:
            return self._warmup(step / self.warmup_steps)
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        return self._cosine(min(1.0, (step - self.warmup_steps) / decay_steps))

    def epoch_lr(self, epoch: int) -> float:
        """timm's per-epoch value at `epoch` (interval "epoch": the lr that epoch `epoch + 1` trains at)."""
        if epoch < self.warmup_epochs:
            return self._warmup(epoch / self.warmup_epochs)
        return self._cosine(epoch / self.epochs) if epoch < self.epochs else self.min_lr

    def _warmup(self, fraction: float) -> float:
        return self.warmup_lr + (self.base_lr - self.warmup_lr) * fraction

    def _cosine(self, progress: float) -> float:
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def values(self) -> np.ndarray:
        """The learning rate of every optimizer update, shape [len(self)]."""
        return np.array([self(step) for step in range(self.total_steps)], dtype=np.float64)
