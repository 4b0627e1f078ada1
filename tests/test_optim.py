"""Weight-decay groups, AdamW/SGD against numpy torch references, lr access, the optim configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from mindspore import Parameter, Tensor, nn
from mindspore.experimental import optim
from omegaconf import OmegaConf

from conformer.train.optim import FusedAdamW, build_optimizer, param_groups, set_lr

CONF = Path(__file__).resolve().parents[1] / "conf"


class Toy(nn.Cell):
    """Every kind of parameter the Conformer has: dense, layer norm, batch norm, cls token, position table."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Dense(4, 3)
        self.ln = nn.LayerNorm((3,))
        self.bn = nn.BatchNorm1d(3)
        self.cls_token = Parameter(Tensor(np.full((1, 1, 3), 0.5, np.float32)), name="cls_token")
        self.pos_embed = Parameter(Tensor(np.full((2, 3), 0.25, np.float32)), name="pos_embed")

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def construct(self, x: Tensor) -> Tensor:
        return self.bn(self.ln(self.dense(x))) + self.cls_token[0] + self.pos_embed.sum()


def group_names(groups: list[dict]) -> list[tuple[set[str], float]]:
    return [({p.name for p in g["params"]}, g["weight_decay"]) for g in groups]


def test_param_groups_exclude_biases_norms_and_tokens() -> None:
    net = Toy()
    groups = group_names(param_groups(net, 0.05))
    no_decay = {"dense.bias", "ln.gamma", "ln.beta", "bn.gamma", "bn.beta", "cls_token", "pos_embed"}
    assert groups == [({"dense.weight"}, 0.05), (no_decay, 0.0)]
    assert "bn.moving_mean" not in set.union(*(names for names, _ in groups))
    only_tokens = group_names(param_groups(net, 0.05, no_decay_names=()))
    assert "cls_token" in only_tokens[0][0]  # 3-D, decayed unless named


def test_build_optimizer_kinds_and_groups() -> None:
    net = Toy()
    adamw = build_optimizer(net, "AdamW", lr=0.01, weight_decay=0.05, betas=OmegaConf.create([0.8, 0.9]))
    assert isinstance(adamw, FusedAdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9)
    unfiltered = build_optimizer(net.trainable_params(), "sgd", lr=0.1, weight_decay=1e-4)
    assert isinstance(unfiltered, optim.SGD) and len(unfiltered.param_groups) == 1
    assert len(build_optimizer(net, "sgd", filter_bias_and_bn=False).param_groups) == 1
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(net, "lamb")
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(net, "adamw", lr=-1.0)


def run_updates(opt: optim.Optimizer, grads: list[list[np.ndarray]]) -> None:
    for step in grads:
        opt(tuple(Tensor(g) for g in step))


def random_grads(params: tuple[Parameter, ...], steps: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.normal(0, 1, p.shape).astype(np.float32) for p in params] for _ in range(steps)]


class BigToy(Toy):
    """Toy with a parameter large enough that the AdamW kernel splits its elements over the cores."""

    def __init__(self) -> None:
        super().__init__()
        self.table = Parameter(Tensor(np.full((300, 256), 0.1, np.float32)), name="table")


def test_adamw_matches_torch_adamw_with_groups(kernel_path: str) -> None:
    net = BigToy()
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.999), 1e-8
    opt = build_optimizer(net, "adamw", lr=lr, weight_decay=wd)
    # one kernel launch per group on the project's path; MindSpore's AdamWeightDecay per parameter on its own
    group_kernel = opt.group_kernel is not None
    assert group_kernel == (kernel_path == "project")
    params = opt.parameters
    decayed = {p.name for p in opt.param_groups[0]["params"]}
    expected = {p.name: p.asnumpy().astype(np.float64) for p in params}
    m = {name: np.zeros_like(v) for name, v in expected.items()}
    v = {name: np.zeros_like(x) for name, x in expected.items()}
    grads = random_grads(params, 3)
    for t, step in enumerate(grads, start=1):
        for p, g in zip(params, step):
            name = p.name
            expected[name] *= 1 - lr * (wd if name in decayed else 0.0)
            m[name] = b1 * m[name] + (1 - b1) * g
            v[name] = b2 * v[name] + (1 - b2) * g.astype(np.float64) ** 2
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            expected[name] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    run_updates(opt, grads)
    assert int(opt.state_step.asnumpy()) == len(grads)
    # AdamWeightDecay takes float32 betas: its 1 - beta2 is 1.3e-5 off torch's; the kernel takes them as float64
    moment_rtol = 1e-6 if group_kernel else 3e-5
    for p, exp_avg, exp_avg_sq in zip(params, opt.exp_avg, opt.exp_avg_sq):
        np.testing.assert_allclose(p.asnumpy(), expected[p.name], rtol=1e-5, atol=1e-6, err_msg=p.name)
        np.testing.assert_allclose(exp_avg.asnumpy(), m[p.name], rtol=1e-6, atol=1e-7, err_msg=p.name)
        np.testing.assert_allclose(exp_avg_sq.asnumpy(), v[p.name], rtol=moment_rtol, atol=1e-9, err_msg=p.name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch_sgd(nesterov: bool) -> None:
    net = Toy()
    lr, wd, mu = 0.1, 0.01, 0.9
    opt = build_optimizer(net, "sgd", lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov)
    params = opt.parameters
    decayed = {p.name for p in opt.param_groups[0]["params"]}
    expected = {p.name: p.asnumpy().astype(np.float64) for p in params}
    buf: dict[str, np.ndarray] = {}
    grads = random_grads(params, 3)
    for step in grads:
        for p, g in zip(params, step):
            name = p.name
            d = g + (wd if name in decayed else 0.0) * expected[name]
            buf[name] = d if name not in buf else mu * buf[name] + d
            expected[name] -= lr * (d + mu * buf[name] if nesterov else buf[name])
    run_updates(opt, grads)
    for p in params:
        np.testing.assert_allclose(p.asnumpy(), expected[p.name], rtol=1e-5, atol=1e-6, err_msg=p.name)


def lrs(opt: optim.Optimizer) -> list[float]:
    return [float(group["lr"].asnumpy()) for group in opt.param_groups]


def test_set_lr() -> None:
    opt = build_optimizer(Toy(), "adamw", lr=0.01)
    set_lr(opt, 2.5e-4)
    assert all(float(g["lr"].asnumpy()) == pytest.approx(2.5e-4) for g in opt.param_groups)
    with pytest.raises(ValueError, match=">= 0"):
        set_lr(opt, float("nan"))
    with pytest.raises(TypeError, match="build_optimizer"):
        set_lr(nn.SGD(Toy().trainable_params()), 0.1)


@pytest.mark.parametrize(("name", "kind", "decay"), [("adamw", FusedAdamW, 0.05), ("sgd", optim.SGD, 1e-4)])
def test_config_builds_the_optimizer(name: str, kind: type, decay: float) -> None:
    cfg = OmegaConf.load(CONF / "optim" / f"{name}.yaml")
    opt = instantiate(cfg.optimizer)(Toy(), lr=3e-4)
    assert isinstance(opt, kind)
    assert [g["weight_decay"] for g in opt.param_groups] == [decay, 0.0]
    assert lrs(opt) == pytest.approx([3e-4, 3e-4])
