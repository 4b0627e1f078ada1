"""The host's side of a log window: the steps' records read back at a log point, checked and averaged."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

from conformer.train.step import StepResult


class StepWindow:
    """The records of the steps since the last log point, and the epoch's sums.

    `add` takes the results of one read (the global step of the first one): a non-finite loss that no loss scale
    explains raises there, naming its step and the window it was found in. Overflow steps stay out of the losses
    (they were skipped), accumulation micro-steps out of the norm (they have none of their own).
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_loss, self.epoch_n = 0.0, 0
        self.reset()

    def reset(self) -> None:
        self.loss, self.norm, self.loss_n, self.norm_n = 0.0, 0.0, 0, 0
        self.loss_scale: float | None = None

    def add(self, results: Iterable[StepResult], first_step: int) -> None:
        results = list(results)
        for step, result in enumerate(results, start=first_step):
            # A dynamic loss scale skips non-finite steps and shrinks; once it cannot shrink further, give up.
            if not math.isfinite(result.loss) and (not result.overflow or result.loss_scale <= 1.0):
                raise FloatingPointError(
                    f"loss is {result.loss} at epoch {self.epoch + 1}, step {step} (read back for the log window of "
                    f"steps {first_step}-{first_step + len(results) - 1}): lower the learning rate or enable "
                    "trainer.clip_grad_norm / trainer.loss_scale")
            if not result.overflow:  # overflow steps were skipped: their loss and inf norm say nothing
                self.loss += result.loss
                self.loss_n += 1
                self.epoch_loss += result.loss
                self.epoch_n += 1
            if result.applied:
                self.norm += result.grad_norm
                self.norm_n += 1
            self.loss_scale = result.loss_scale

    @property
    def counted(self) -> int:
        """Steps of the window whose loss counts (not skipped for an overflow)."""
        return self.loss_n

    @property
    def mean_loss(self) -> float:
        return self.loss / self.loss_n if self.loss_n else math.nan

    @property
    def mean_norm(self) -> float:
        return self.norm / max(self.norm_n, 1)


class Throughput:
    """Images per second over a sliding window of steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0
