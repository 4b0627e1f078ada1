"""ModelEma: numeric update (an asymmetric decay, where shadow and live weights cannot trade places unseen),
swapping for evaluation, checkpoints, the train-step hook."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from conformer.train.ema import ModelEma
from conformer.train.losses import DualHeadLoss
from conformer.train.optim import build_optimizer
from conformer.train.step import TrainStep


class Net(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Dense(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head_a = nn.Dense(4, 2)
        self.head_b = nn.Dense(4, 2)

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = ops.relu(self.bn(self.dense(x)))
        return self.head_a(h), self.head_b(h)


def values(net: nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def fill(net: nn.Cell, value: float) -> None:
    for p in net.get_parameters():
        p.set_data(Tensor(np.full(p.shape, value, np.float32)))


def test_update_with_decay_half_covers_params_and_bn_stats() -> None:
    net = Net()
    fill(net, 1.0)
    ema = ModelEma(net, decay=0.5)
    assert set(ema.parameters_dict()) == set(values(net))
    assert {"bn.moving_mean", "bn.moving_variance"} <= set(ema.parameters_dict())
    fill(net, 3.0)
    ema.update()
    fill(net, 5.0)
    ema.update()
    for name, shadow in ema.parameters_dict().items():
        np.testing.assert_allclose(shadow.asnumpy(), 3.5, err_msg=name)  # 0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 5


def test_update_weights_the_shadow_by_the_decay_and_the_live_weights_by_the_rest() -> None:
    """decay 0.9, not 0.5: `shadow * (1 - d) + live * d` gives 2.8 here instead of 1.2 after the first update."""
    net = Net()
    fill(net, 1.0)
    ema = ModelEma(net, decay=0.9)
    fill(net, 3.0)
    ema.update()
    for name, shadow in ema.parameters_dict().items():
        np.testing.assert_allclose(shadow.asnumpy(), 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6, err_msg=name)
    fill(net, 11.0)
    ema.update()
    for name, shadow in ema.parameters_dict().items():
        np.testing.assert_allclose(shadow.asnumpy(), 0.9 * 1.2 + 0.1 * 11.0, rtol=1e-6, err_msg=name)  # 2.18
    with ema.swapped(net):  # the evaluated weights are the shadow ones, not the live ones
        for name, value in values(net).items():
            np.testing.assert_allclose(value, 2.18, rtol=1e-6, err_msg=name)


def test_swapped_evaluates_with_ema_weights_and_restores() -> None:
    net = Net()
    fill(net, 2.0)
    ema = ModelEma(net, decay=0.5)
    fill(net, 4.0)
    ema.update()  # shadow 3.0
    for _ in range(2):  # the second swap reuses the compiled copies
        with ema.swapped(net):
            assert all(np.allclose(v, 3.0) for v in values(net).values())
        assert all(np.allclose(v, 4.0) for v in values(net).values())
        assert all(np.allclose(p.asnumpy(), 3.0) for p in ema.parameters_dict().values())
    with pytest.raises(RuntimeError, match="inside"), ema.swapped():
        raise RuntimeError("failure inside the evaluation")
    assert all(np.allclose(v, 4.0) for v in values(net).values())
    with pytest.raises(ValueError, match="not the network"), ema.swapped(Net()):
        pass


def test_checkpoint_round_trip(tmp_path) -> None:
    net = Net()
    ema = ModelEma(net, decay=0.5)
    fill(net, 7.0)
    ema.update()
    path = str(tmp_path / "ema.ckpt")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in ema.parameters_dict().items()], path)
    restored = ModelEma(net, decay=0.5)
    restored.load_parameters_dict(ms.load_checkpoint(path))
    for name, shadow in restored.parameters_dict().items():
        np.testing.assert_array_equal(shadow.asnumpy(), ema.parameters_dict()[name].asnumpy())
    with pytest.raises(KeyError, match="missing"):
        restored.load_parameters_dict({})
    with pytest.raises(ValueError, match="decay"):
        ModelEma(net, decay=1.5)


def test_train_step_updates_ema_only_after_applied_updates() -> None:
    ms.set_seed(0)
    net = Net()
    ema = ModelEma(net, decay=0.75)
    initial = values(net)
    step = TrainStep(net, DualHeadLoss(), build_optimizer(net, "adamw", lr=0.1), grad_accum_steps=2, ema=ema)
    x = Tensor(np.random.default_rng(0).normal(0, 1, (8, 3)).astype(np.float32))
    y = Tensor(np.array([0, 1] * 4, np.int32))
    assert not step(x, y).applied
    for name, shadow in ema.parameters_dict().items():
        np.testing.assert_array_equal(shadow.asnumpy(), initial[name], err_msg=name)
    assert step(x, y).applied
    live = values(net)
    assert not np.allclose(live["dense.weight"], initial["dense.weight"])
    for name, shadow in ema.parameters_dict().items():
        np.testing.assert_allclose(shadow.asnumpy(), 0.75 * initial[name] + 0.25 * live[name], rtol=1e-6,
                                   err_msg=name)
