"""Per-iteration warmup + cosine schedule, lr scaling and the optim config's schedule node."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conformer.schedules import WarmupCosineSchedule, scale_lr

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE, WARM, MIN = 1e-3, 1e-6, 1e-5


def make(**overrides) -> WarmupCosineSchedule:
    kwargs = dict(base_lr=BASE, warmup_lr=WARM, min_lr=MIN, warmup_epochs=2, epochs=7, steps_per_epoch=5)
    kwargs.update(overrides)
    return WarmupCosineSchedule(**kwargs)


def test_key_points_of_warmup_and_cosine() -> None:
    schedule = make()  # 35 steps, 10 warmup steps, cosine over steps 10..34
    assert len(schedule) == 35
    assert schedule(0) == pytest.approx(WARM)
    assert schedule(5) == pytest.approx(WARM + (BASE - WARM) * 0.5)
    assert schedule(10) == pytest.approx(BASE)
    assert schedule(22) == pytest.approx((BASE + MIN) / 2)  # halfway through the 24 cosine intervals
    assert schedule(16) == pytest.approx(MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi * 0.25)))
    assert schedule(34) == pytest.approx(MIN)
    assert schedule(1000) == pytest.approx(MIN)


def test_values_are_the_calls_and_pieces_are_monotone() -> None:
    schedule = make(warmup_epochs=1.5, epochs=10, steps_per_epoch=8)
    values = schedule.values()
    assert values.shape == (80,)
    np.testing.assert_allclose(values, [schedule(i) for i in range(80)])
    warmup, cosine = values[:12], values[12:]
    assert np.all(np.diff(warmup) > 0) and np.all(np.diff(cosine) < 0)
    assert values.max() == pytest.approx(BASE) and values.min() == pytest.approx(WARM)


def test_no_warmup_starts_at_base_lr() -> None:
    schedule = make(warmup_epochs=0)
    assert schedule(0) == pytest.approx(BASE) and schedule(len(schedule) - 1) == pytest.approx(MIN)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"base_lr": -1e-3}, "base_lr"),
    ({"min_lr": float("nan")}, "min_lr"),
    ({"min_lr": 1e-2}, "must not exceed base_lr"),
    ({"warmup_epochs": 7}, "smaller than"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"epochs": 2.5}, "integers"),
])
def test_bad_arguments_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_negative_step_is_rejected() -> None:
    with pytest.raises(ValueError, match="step"):
        make()(-1)


def test_scale_lr() -> None:
    assert scale_lr(1e-3, 256, 1024, "linear") == pytest.approx(2.5e-4)
    assert scale_lr(1e-3, 256, 1024, "none") == 1e-3
    with pytest.raises(ValueError, match="linear"):
        scale_lr(1e-3, 256, 1024, "sqrt")
    with pytest.raises(ValueError, match="batch"):
        scale_lr(1e-3, 0, 1024, "linear")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_config_schedule_is_completed_at_runtime(name: str) -> None:
    cfg = OmegaConf.load(CONF / "optim" / f"{name}.yaml")
    assert cfg.lr_scaling in ("none", "linear") and cfg.reference_batch_size > 0
    schedule = instantiate(cfg.schedule)(epochs=10, steps_per_epoch=4)
    assert isinstance(schedule, WarmupCosineSchedule) and len(schedule) == 40
    assert schedule(0) == pytest.approx(cfg.schedule.warmup_lr)
    assert schedule(cfg.schedule.warmup_epochs * 4) == pytest.approx(cfg.schedule.base_lr)
    assert schedule(39) == pytest.approx(cfg.schedule.min_lr)


def test_adamw_config_is_the_seed_recipe() -> None:
    cfg = OmegaConf.load(CONF / "optim" / "adamw.yaml")
    assert (cfg.schedule.base_lr, cfg.schedule.warmup_lr, cfg.schedule.min_lr) == (1e-3, 1e-6, 1e-5)
    assert cfg.schedule.warmup_epochs == 5 and cfg.reference_batch_size == 1024
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.weight_decay == 0.05
    assert list(cfg.optimizer.betas) == [0.9, 0.999]
