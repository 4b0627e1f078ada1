"""Warmup + cosine schedule (per step and timm's per epoch), lr scaling and the optim config's schedule node."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conformer.train.schedules import INTERVALS, LR_SCALING_MODES, WarmupCosineSchedule, scale_lr

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
    assert schedule(3) == pytest.approx(WARM + (BASE - WARM) * 0.3)  # off the midpoint: a reversed ramp shows
    assert schedule(8) == pytest.approx(WARM + (BASE - WARM) * 0.8)
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
    ({"interval": "iteration"}, "interval"),
    ({"lr_scaling": "sqrt", "global_batch": 256}, "unknown"),
    ({"lr_scaling": "linear"}, "global_batch"),
    ({"lr_scaling": "linear", "global_batch": 0}, "batch sizes"),
    ({"lr_scaling": "linear", "global_batch": 8}, "must not exceed base_lr"),  # 1e-3 * 8 / 1024 < min_lr
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
    assert scale_lr(1e-3, None, 1024, "none") == 1e-3
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(1e-3, None, 1024, "linear")


def test_linear_scaling_scales_only_base_lr() -> None:
    schedule = make(lr_scaling="linear", global_batch=256, reference_batch_size=1024)
    assert schedule.base_lr == pytest.approx(2.5e-4) and schedule.configured_base_lr == BASE
    assert (schedule.warmup_lr, schedule.min_lr) == (WARM, MIN)
    assert schedule(0) == pytest.approx(WARM)
    assert schedule(10) == pytest.approx(2.5e-4)
    assert schedule(22) == pytest.approx((2.5e-4 + MIN) / 2)
    assert schedule(34) == pytest.approx(MIN)
    unscaled = make(lr_scaling="none", global_batch=256, reference_batch_size=1024)
    assert unscaled.base_lr == unscaled.configured_base_lr == BASE
    np.testing.assert_array_equal(unscaled.values(), make().values())


def test_step_interval_is_the_default_and_changes_within_an_epoch() -> None:
    schedule = make(interval="step")
    np.testing.assert_array_equal(schedule.values(), make().values())
    assert schedule(3) == pytest.approx(WARM + (BASE - WARM) * 0.3)
    assert schedule(28) == pytest.approx(MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi * 0.75)))
    assert len(set(schedule.values()[10:15])) == 5


# timm's CosineLRScheduler per epoch t (t_initial=7, warmup_t=2, base 1e-3, warmup 1e-6, min 1e-5), by hand:
# t < 2: 1e-6 + t * (1e-3 - 1e-6) / 2; 2 <= t < 7: 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + cos(pi * t / 7)); t >= 7: 1e-5
TIMM_7_EPOCHS = [1e-6, 5.005e-4, 8.136274519e-4, 6.151478623e-4, 3.948521377e-4, 1.963725481e-4,
                 5.902041039e-5, 1e-5]


def test_epoch_interval_reproduces_timm_cosine_per_epoch() -> None:
    schedule = make(interval="epoch")  # 7 epochs of 5 updates, 2 warmup epochs
    np.testing.assert_allclose([schedule.epoch_lr(t) for t in range(8)], TIMM_7_EPOCHS, rtol=1e-9)
    assert schedule.epoch_lr(50) == MIN


def test_epoch_interval_lags_one_epoch_and_is_constant_within_an_epoch() -> None:
    schedule = make(interval="epoch")
    # scheduler.step(epoch) runs after the epoch: epoch 0 trains at the constructor's lr(0), epoch e at lr(e - 1)
    per_epoch = [TIMM_7_EPOCHS[0]] + TIMM_7_EPOCHS[:6]
    values = schedule.values()
    assert values.shape == (35,)
    np.testing.assert_allclose(values, np.repeat(per_epoch, 5), rtol=1e-9)
    np.testing.assert_array_equal(values, [schedule(i) for i in range(35)])
    assert schedule(35) == pytest.approx(TIMM_7_EPOCHS[6]) and schedule(40) == pytest.approx(MIN)


def test_epoch_interval_official_recipe_key_points() -> None:
    # Conformer's main.py: 300 epochs, warmup 5 epochs from 1e-6, lr 1e-3, min_lr 1e-5
    schedule = make(warmup_epochs=5, epochs=300, steps_per_epoch=3, interval="epoch")
    values = schedule.values().reshape(300, 3)
    assert np.all(values == values[:, :1])
    lrs = values[:, 0]
    assert lrs[0] == lrs[1] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(8.002e-4)  # lr(4) = 1e-6 + 4 / 5 * (1e-3 - 1e-6)
    assert lrs[6] == pytest.approx(9.993216197e-4, rel=1e-9)  # lr(5): the cosine at 5 / 300, below base_lr
    assert lrs[151] == pytest.approx(5.05e-4)  # lr(150) = (base + min) / 2
    assert lrs[299] == pytest.approx(1.010856168e-5, rel=1e-9)  # lr(298): the last epoch trained
    assert lrs.max() < BASE and np.all(np.diff(lrs[1:6]) > 0) and np.all(np.diff(lrs[6:]) < 0)


def test_epoch_interval_with_linear_scaling_and_no_warmup() -> None:
    schedule = make(warmup_epochs=0, lr_scaling="linear", global_batch=2048, reference_batch_size=1024,
                    interval="epoch")
    assert schedule(0) == schedule(9) == pytest.approx(2e-3)  # epochs 0 and 1 at lr(0) = base_lr
    assert schedule(10) == pytest.approx(MIN + 0.5 * (2e-3 - MIN) * (1 + math.cos(math.pi / 7)))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_config_schedule_is_completed_at_runtime(name: str) -> None:
    cfg = OmegaConf.load(CONF / "optim" / f"{name}.yaml")
    node = cfg.schedule
    assert "lr_scaling" not in cfg and "reference_batch_size" not in cfg  # moved into optim.schedule
    assert node.lr_scaling in LR_SCALING_MODES and node.reference_batch_size > 0 and node.interval in INTERVALS
    global_batch = 2 * node.reference_batch_size
    base = node.base_lr * (2 if node.lr_scaling == "linear" else 1)
    schedule = instantiate(node)(epochs=10, steps_per_epoch=4, global_batch=global_batch)
    assert isinstance(schedule, WarmupCosineSchedule) and len(schedule) == 40
    assert schedule.interval == node.interval and schedule.configured_base_lr == node.base_lr
    assert schedule.base_lr == pytest.approx(base)
    assert schedule(0) == pytest.approx(node.warmup_lr)
    per_step = instantiate(node, interval="step")(epochs=10, steps_per_epoch=4, global_batch=global_batch)
    assert per_step(0) == pytest.approx(node.warmup_lr)
    assert per_step(node.warmup_epochs * 4) == pytest.approx(base)
    assert per_step(39) == pytest.approx(node.min_lr)


def test_adamw_config_is_the_seed_recipe() -> None:
    cfg = OmegaConf.load(CONF / "optim" / "adamw.yaml")
    assert (cfg.schedule.base_lr, cfg.schedule.warmup_lr, cfg.schedule.min_lr) == (1e-3, 1e-6, 1e-5)
    assert cfg.schedule.warmup_epochs == 5 and cfg.schedule.reference_batch_size == 1024
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.weight_decay == 0.05
    assert list(cfg.optimizer.betas) == [0.9, 0.999]
