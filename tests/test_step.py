"""The compiled train step: learning, clipping, loss scaling/overflow, accumulation, weight decay, live lr."""
from __future__ import annotations

import gc

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from conformer.train import graphs
from conformer.train.losses import DualHeadLoss
from conformer.train.optim import build_optimizer, set_lr
from conformer.train.step import StepResult, TrainStep, apply_amp, data_parallel_reducer

IN, HIDDEN, CLASSES = 6, 16, 3


class TwoHeads(nn.Cell):
    """Shared Dense (+ optional BatchNorm1d) feeding two Dense heads; `spare` takes no part in the forward."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Dense(IN, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN) if bn else nn.Identity()
        self.conv_head = nn.Dense(HIDDEN, CLASSES)
        self.trans_head = nn.Dense(HIDDEN, CLASSES)
        self.spare = nn.Dense(2, 2)

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = ops.relu(self.norm(self.stem(x)))
        return self.conv_head(h), self.trans_head(h)


def blobs(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(0, 2.0, (CLASSES, IN))
    labels = rng.integers(0, CLASSES, n)
    x = centers[labels] + rng.normal(0, 0.5, (n, IN))
    return Tensor(x.astype(np.float32)), Tensor(labels.astype(np.int32))


def weights(net: nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def copy_weights(src: nn.Cell, dst: nn.Cell) -> None:
    for a, b in zip(src.get_parameters(), dst.get_parameters()):
        b.set_data(Tensor(a.asnumpy().copy()))


def reference_grads(net: nn.Cell, loss_fn: nn.Cell, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    params = net.trainable_params()

    def forward(images: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(net(images), targets)

    _, grads = ms.value_and_grad(forward, None, params)(x, y)
    return {p.name: g.asnumpy() for p, g in zip(params, grads)}


def test_learns_and_updates_bn_stats_even_after_eval() -> None:
    ms.set_seed(0)
    net = TwoHeads(bn=True)
    step = TrainStep(net, DualHeadLoss(0.1), build_optimizer(net, "adamw", lr=0.02))
    x, y = blobs(64)
    first = step(x, y)
    assert isinstance(first, StepResult) and first.applied and not first.overflow
    assert first.loss_scale == 1.0 and first.grad_norm > 0
    losses = [step(x, y).loss for _ in range(25)]
    assert losses[-1] < 0.5 * first.loss
    net.set_train(False)
    net(x)  # an eval pass in between, as the trainer does every epoch
    mean_before = net.norm.moving_mean.asnumpy().copy()
    step(x, y)
    assert net.training
    assert not np.allclose(net.norm.moving_mean.asnumpy(), mean_before)


@pytest.mark.parametrize("clip", [0.05, 1e3])
def test_clip_reports_raw_norm_and_scales_update(clip: float, kernel_path: str) -> None:
    ms.set_seed(1)
    net, loss_fn = TwoHeads(), DualHeadLoss()
    opt = build_optimizer(net, "sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
    x, y = blobs(16, seed=1)
    grads = reference_grads(net, loss_fn, x, y)
    norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    before = weights(net)
    result = TrainStep(net, loss_fn, opt, clip_grad_norm=clip)(x, y)
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    coef = min(1.0, clip / (norm + 1e-6))
    after = weights(net)
    for name, grad in grads.items():
        np.testing.assert_allclose(before[name] - after[name], coef * grad, rtol=1e-4, atol=1e-7)
    if clip < norm:
        delta = np.sqrt(sum(((before[n] - after[n]) ** 2).sum() for n in grads))
        assert delta == pytest.approx(clip, rel=1e-4)


def test_dynamic_overflow_skips_update_and_lowers_scale_then_grows(kernel_path: str) -> None:
    ms.set_seed(2)
    net = TwoHeads()
    step = TrainStep(net, DualHeadLoss(), build_optimizer(net, "adamw", lr=0.1), loss_scale="dynamic",
                     init_loss_scale=2.0**10, scale_window=2)
    x, y = blobs(8, seed=2)
    bad = x.asnumpy().copy()
    bad[0, 0] = np.inf
    before = weights(net)
    result = step(Tensor(bad), y)
    assert result.overflow and not result.applied
    assert result.loss_scale == 2.0**9
    for name, value in weights(net).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    scales = [step(x, y) for _ in range(2)]
    assert all(r.applied and not r.overflow for r in scales)
    assert [r.loss_scale for r in scales] == [2.0**9, 2.0**10]  # grows after scale_window finite updates
    state = {name: Tensor(p.asnumpy()) for name, p in step.parameters_dict().items()}
    assert set(state) == {"loss_scale.value", "loss_scale.counter"}
    step.load_parameters_dict({"loss_scale.value": Tensor(np.float32(8.0))})
    assert step(x, y).loss_scale == 8.0  # restored in place: the compiled step sees it
    step.load_parameters_dict(state)
    assert step(x, y).loss_scale == 2.0**10


def test_dynamic_scale_shrinks_and_grows_by_its_own_factor_and_unscales_the_gradients() -> None:
    """scale_factor 4 and scale_window 3 (not the defaults 2 and 2): an overflow divides the scale by 4, three finite
    updates multiply it by 4, and every applied update is the unscaled one (equal to an unscaled step's)."""
    ms.set_seed(5)
    x, y = blobs(8, seed=5)
    plain, scaled = TwoHeads(), TwoHeads()
    copy_weights(plain, scaled)
    steps = [TrainStep(plain, DualHeadLoss(), build_optimizer(plain, "sgd", lr=0.3, momentum=0.0)),
             TrainStep(scaled, DualHeadLoss(), build_optimizer(scaled, "sgd", lr=0.3, momentum=0.0),
                       loss_scale="dynamic", init_loss_scale=2.0**12, scale_factor=4, scale_window=3)]
    bad = x.asnumpy().copy()
    bad[3, 1] = np.inf
    assert steps[1](Tensor(bad), y).loss_scale == 2.0**10
    scales = []
    for _ in range(4):
        results = [step(x, y) for step in steps]
        assert results[1].applied and results[1].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-5)
        scales.append(results[1].loss_scale)
    assert scales == [2.0**10, 2.0**10, 2.0**12, 2.0**12]
    for name, value in weights(plain).items():
        np.testing.assert_allclose(weights(scaled)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_static_scale_unscales_grads_and_overflow_skips(kernel_path: str) -> None:
    ms.set_seed(3)
    x, y = blobs(8, seed=3)
    plain, scaled = TwoHeads(), TwoHeads()
    copy_weights(plain, scaled)
    steps = [TrainStep(net, DualHeadLoss(), build_optimizer(net, "sgd", lr=0.5, momentum=0.0),
                       loss_scale=mode, init_loss_scale=scale)
             for net, mode, scale in ((plain, "none", 1.0), (scaled, "static", 1e30))]
    results = [step(x, y) for step in steps]
    assert results[1].loss_scale == pytest.approx(1e30, rel=1e-6)
    assert results[1].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-5)
    for name, value in weights(plain).items():
        np.testing.assert_allclose(weights(scaled)[name], value, rtol=1e-5, atol=1e-6)
    bad = x.asnumpy().copy()
    bad[1, 2] = np.nan
    before = weights(scaled)
    overflow = steps[1](Tensor(bad), y)
    assert overflow.overflow and not overflow.applied
    assert overflow.loss_scale == pytest.approx(1e30, rel=1e-6)  # static: never adjusted
    for name, value in weights(scaled).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_accumulating_two_half_batches_equals_one_full_batch(name: str, kernel_path: str) -> None:
    ms.set_seed(4)
    full_net, accum_net = TwoHeads(), TwoHeads()
    copy_weights(full_net, accum_net)
    full = TrainStep(full_net, DualHeadLoss(0.1), build_optimizer(full_net, name, lr=0.05))
    accum = TrainStep(accum_net, DualHeadLoss(0.1), build_optimizer(accum_net, name, lr=0.05),
                      grad_accum_steps=2)
    for seed in (4, 5):  # two windows: the accumulators must be zeroed after each update
        x, y = blobs(16, seed=seed)
        full_result = full(x, y)
        halves = [accum(x[:8], y[:8]), accum(x[8:], y[8:])]
        assert [r.applied for r in halves] == [False, True]
        assert accum.micro_step == 0
        assert halves[1].grad_norm == pytest.approx(full_result.grad_norm, rel=1e-5)
        assert (halves[0].loss + halves[1].loss) / 2 == pytest.approx(full_result.loss, rel=1e-5)
    for a, b in zip(full_net.get_parameters(), accum_net.get_parameters()):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)


def test_adamw_decays_zero_grad_weight_but_not_bias(kernel_path: str) -> None:
    ms.set_seed(5)
    net = TwoHeads()
    lr, wd = 0.1, 0.05
    step = TrainStep(net, DualHeadLoss(), build_optimizer(net, "adamw", lr=lr, weight_decay=wd))
    w, b = net.spare.weight.asnumpy().copy(), net.spare.bias.asnumpy().copy()
    step(*blobs(8))
    np.testing.assert_allclose(net.spare.weight.asnumpy(), w * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_array_equal(net.spare.bias.asnumpy(), b)


def test_set_lr_takes_effect_inside_compiled_step() -> None:
    ms.set_seed(6)
    net, loss_fn = TwoHeads(), DualHeadLoss()
    opt = build_optimizer(net, "sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    step = TrainStep(net, loss_fn, opt)
    x, y = blobs(8, seed=6)
    step(x, y)  # compiled with lr 0.1
    set_lr(opt, 0.0)
    before = weights(net)
    step(x, y)
    for name, value in weights(net).items():
        np.testing.assert_array_equal(value, before[name])
    set_lr(opt, 0.5)
    grads = reference_grads(net, loss_fn, x, y)
    step(x, y)
    after = weights(net)
    for name, grad in grads.items():
        np.testing.assert_allclose(before[name] - after[name], 0.5 * grad, rtol=1e-4, atol=1e-7)


def test_the_lr_table_in_the_graph_gives_the_set_lr_updates_to_the_bit() -> None:
    """The graph takes update `counter // grad_accum_steps`'s lr from the table (past its end: the last one) and
    weights come out equal to the bit to a step driven by `set_lr`; the records ring gives the same results."""
    lrs = np.array([0.3, 0.07, 0.011, 0.5], np.float64)  # float64 as the schedule's values(); 0.07 rounds in float32
    nets = [TwoHeads(bn=True), TwoHeads(bn=True)]
    copy_weights(nets[0], nets[1])
    plain = TrainStep(nets[0], DualHeadLoss(), build_optimizer(nets[0], "adamw", lr=1.0), grad_accum_steps=2)
    table = TrainStep(nets[1], DualHeadLoss(), build_optimizer(nets[1], "adamw", lr=1.0), grad_accum_steps=2,
                      lr_values=lrs, window=3)
    table.seek(2)  # as a resumed run at micro-step 2: update 1 comes first
    plain_results, table_results = [], []
    for micro_step in range(2, 12):
        x, y = blobs(8, seed=micro_step)
        set_lr(plain.optimizer, float(lrs[min(micro_step // 2, len(lrs) - 1)]))
        plain_results.append(plain(x, y))
        table.launch(x, y)
        if micro_step % 3 == 1:  # a read every 3 launches, as a log window of 3
            table_results += table.results()
    table_results += table.results()
    assert table_results == plain_results and sum(r.applied for r in table_results) == 5
    for name, value in weights(nets[0]).items():
        np.testing.assert_array_equal(weights(nets[1])[name], value, err_msg=name)
    assert [group["lr"].asnumpy() for group in table.optimizer.param_groups] == \
        [np.float32(0.5)] * len(table.optimizer.param_groups)


def test_more_launches_than_the_window_without_a_read_are_refused() -> None:
    net = TwoHeads()
    step = TrainStep(net, DualHeadLoss(), build_optimizer(net, "sgd", lr=0.1), window=2)
    step.launch(*blobs(4))
    step.launch(*blobs(4))
    with pytest.raises(RuntimeError, match="2 steps are waiting to be read"):
        step.launch(*blobs(4))
    assert len(step.results()) == 2 and step.results() == []


def test_a_step_built_while_an_earlier_one_is_garbage_compiles_once() -> None:
    """A sweep's next trial: the previous trial's step (cells hold reference cycles) awaits collection when the new
    step compiles; its second call must not compile the same graph again."""
    x, y = blobs(8)

    def build() -> TrainStep:
        net = TwoHeads()
        return TrainStep(net, DualHeadLoss(), build_optimizer(net, "sgd", lr=0.1))

    gc.disable()  # only explicit collections, so the earlier step is still garbage at the compile
    try:
        graphs.start_run()
        earlier = build()
        earlier(x, y)
        del earlier
        graphs.start_run()
        step = build()
        step(x, y)
        step(x, y)
    finally:
        gc.enable()
    assert len(step._cell.compile_cache) == 1  # the graphs this cell compiled


def test_bad_arguments_fail_early() -> None:
    net, other = TwoHeads(), TwoHeads()
    opt = build_optimizer(net, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="loss_scale"):
        TrainStep(net, DualHeadLoss(), opt, loss_scale="fp16")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainStep(net, DualHeadLoss(), opt, grad_accum_steps=0)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        TrainStep(net, DualHeadLoss(), opt, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="not in the network"):
        TrainStep(other, DualHeadLoss(), opt)
    with pytest.raises(TypeError, match="experimental"):
        TrainStep(net, DualHeadLoss(), nn.SGD(net.trainable_params()))
    with pytest.raises(ValueError, match="amp level"):
        apply_amp(net, "O4")
    assert apply_amp(net, "O0") is net
    assert data_parallel_reducer(tuple(net.trainable_params())) is None  # stand-alone: no all-reduce
