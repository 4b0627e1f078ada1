"""The arguments of the training components (loss, optimizer, EMA, trainer), checked without MindSpore: each
component runs its check when built, and `validate_config` runs it on the config node before anything is built."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conformer.checks import number as _number

OPTIMIZERS = ("adamw", "sgd")


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


def check_ema_decay(decay: Any) -> float:
    if not 0.0 <= _number(decay, "decay") <= 1.0:
        raise ValueError(f"ModelEma: decay must be in [0, 1], got {decay}.")
    return float(decay)


SINK_DEVICES = ("GPU", "Ascend")  # where `ms.data_sink` runs


def check_sink_size(sink_size: Any, device_target: str | None, grad_accum_steps: Any = 1,
                    log_every_n_steps: Any = 10, overfit_batches: Any = None, save_every_n_steps: Any = None) -> None:
    """`trainer.sink_size` (steps per `ms.data_sink` call): GPU and Ascend only, whole updates, log points and step
    checkpoints on a call's boundary (`device_target` None: not known yet, checked when the trainer is built)."""
    if sink_size is None:
        return
    if isinstance(sink_size, bool) or not isinstance(sink_size, int) or sink_size < 1:
        raise ValueError(f"trainer.sink_size={sink_size!r} must be an integer >= 1, or null for off")
    if device_target is not None and device_target not in SINK_DEVICES:
        raise ValueError(f"trainer.sink_size={sink_size}: data sinking runs on GPU and Ascend, this run is on the "
                         f"{device_target}: set trainer.sink_size=null")
    if grad_accum_steps != 1 or overfit_batches:
        raise ValueError(f"trainer.sink_size={sink_size} sinks whole updates of fresh batches: it needs "
                         "trainer.grad_accum_steps=1 and no trainer.overfit_batches")
    for key, every in (("log_every_n_steps", log_every_n_steps), ("save_every_n_steps", save_every_n_steps)):
        if every and every % sink_size:
            raise ValueError(f"trainer.{key}={every} must be a multiple of trainer.sink_size={sink_size}: the host "
                             "sees the steps once per sink call")


def check_trainer(ema_decay: Any = None, sink_size: Any = None, device_target: str | None = None,
                  grad_accum_steps: Any = 1, log_every_n_steps: Any = 10, overfit_batches: Any = None,
                  save_every_n_steps: Any = None, **_: Any) -> None:
    """The Trainer's own arguments beyond `validate_config`'s integers and choices (`device_target`: the
    hardware's, which validate_config supplies)."""
    if ema_decay:
        check_ema_decay(ema_decay)
    check_sink_size(sink_size, device_target, grad_accum_steps, log_every_n_steps, overfit_batches,
                    save_every_n_steps)
