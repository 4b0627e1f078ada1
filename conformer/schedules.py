"""Per-iteration learning-rate schedules and batch-size lr scaling."""
from __future__ import annotations

import math

import numpy as np

LR_SCALING_MODES = ("none", "linear")


def scale_lr(base_lr: float, global_batch: int, reference_batch: int, mode: str = "none") -> float:
    """The lr at `global_batch`: `base_lr` ("none") or base_lr * global_batch / reference_batch ("linear")."""
    if mode not in LR_SCALING_MODES:
        raise ValueError(f"lr scaling mode {mode!r} is unknown; choose one of {LR_SCALING_MODES}.")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got global_batch={global_batch}, "
                         f"reference_batch={reference_batch}.")
    if mode == "linear":
        return base_lr * global_batch / reference_batch
    return base_lr


class WarmupCosineSchedule:
    """Linear warmup from `warmup_lr` to `base_lr`, then cosine decay to `min_lr` at the last step.

    Stepped per iteration: there are `epochs * steps_per_epoch` steps, of which the first
    `round(warmup_epochs * steps_per_epoch)` warm up (step 0 is `warmup_lr`, the first cosine step is
    `base_lr`). Steps past the end return `min_lr`.
    """

    def __init__(self, base_lr: float, warmup_lr: float, min_lr: float, warmup_epochs: float, epochs: int,
                 steps_per_epoch: int) -> None:
        for name, value in (("base_lr", base_lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr),
                            ("warmup_epochs", warmup_epochs)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"WarmupCosineSchedule: {name} must be a finite number >= 0, got {value}.")
        if min_lr > base_lr:
            raise ValueError(f"WarmupCosineSchedule: min_lr ({min_lr}) must not exceed base_lr ({base_lr}).")
        if not all(int(n) == n and n >= 1 for n in (epochs, steps_per_epoch)):
            raise ValueError(f"WarmupCosineSchedule: epochs and steps_per_epoch must be integers >= 1, got "
                             f"epochs={epochs}, steps_per_epoch={steps_per_epoch}.")
        if warmup_epochs >= epochs:
            raise ValueError(f"WarmupCosineSchedule: warmup_epochs ({warmup_epochs}) must be smaller than "
                             f"epochs ({epochs}); lower warmup_epochs or train longer.")
        self.base_lr, self.warmup_lr, self.min_lr = float(base_lr), float(warmup_lr), float(min_lr)
        self.total_steps = int(epochs) * int(steps_per_epoch)
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    def __len__(self) -> int:
        return self.total_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"WarmupCosineSchedule: step must be >= 0, got {step}.")
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def values(self) -> np.ndarray:
        """The learning rate of every step, shape [len(self)]."""
        return np.array([self(step) for step in range(self.total_steps)], dtype=np.float64)
