"""Optimizers with torch semantics (mindspore.experimental.optim), weight-decay groups and lr access."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Union

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.experimental import optim

from conformer.kernels.ops import adamw_kernel
from conformer.train.arguments import check_adamw, check_optimizer

ParamsOrNetwork = Union[nn.Cell, Iterable[Parameter], Iterable[dict]]
_fused_adamw = ops.MultitypeFuncGraph("fused_adamw")


@_fused_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor")
def _fused_adamw_update(kernel: ops.Primitive, beta1: Tensor, beta2: Tensor, lr: Tensor, eps: Tensor,
                        decay: Tensor, param: Parameter, exp_avg: Parameter, exp_avg_sq: Parameter,
                        grad: Tensor) -> Tensor:
    return ops.depend(True, kernel(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, grad))


class FusedAdamW(optim.Optimizer):
    """torch.optim.AdamW (decoupled decay, bias-corrected): on the CPU one launch of the project's kernel per
    parameter group (`conformer/kernels/adamw.cc`, torch's formula), elsewhere one `AdamWeightDecay` per parameter.

    `AdamWeightDecay` lacks Adam's bias correction; with c1 = 1 - beta1^t and c2 = sqrt(1 - beta2^t) it is folded
    into its scalars: lr' = lr c2 / c1, eps' = eps c2, decay' = decay c1 / c2, which gives torch's update exactly
    (p -= lr decay p + lr m_hat / (sqrt(v_hat) + eps)). `mindspore.experimental.optim.AdamW` issues ~13 ops per
    parameter instead; state names (exp_avg, exp_avg_sq, state_step) are the same, so checkpoints carry over.
    """

    def __init__(self, params: Iterable[Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        betas = check_adamw(betas, eps)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": float(eps), "weight_decay": float(weight_decay)})
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.state_step = Parameter(Tensor(0, ms.int32), "state_step")
        self.kernel = ops.AdamWeightDecay()
        self.update = ops.HyperMap()
        self.group_kernel = adamw_kernel() if all(param.dtype == ms.float32 for param in self.parameters) else None
        self.group_constants = tuple(Tensor([*group["betas"], group["eps"], group["weight_decay"]], ms.float64)
                                     for group in self.param_groups)

    def construct(self, gradients: tuple[Tensor, ...]) -> bool:
        step = ops.assign_add(self.state_step, Tensor(1, ms.int32))
        if self.group_kernel is not None:
            return self.update_groups(gradients, step)
        step = step.astype(ms.float32)
        done = True
        for group_id, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            start, end = self.group_start_id[group_id], self.group_start_id[group_id + 1]
            beta1, beta2 = Tensor(beta1, ms.float32), Tensor(beta2, ms.float32)
            c1 = 1.0 - ops.pow(beta1, step)
            c2 = ops.sqrt(1.0 - ops.pow(beta2, step))
            lr = self.lrs[group_id] * c2 / c1
            eps = group["eps"] * c2
            decay = group["weight_decay"] * c1 / c2
            done = ops.depend(done, self.update(
                ops.partial(_fused_adamw, self.kernel, beta1, beta2, lr, eps, decay), self.parameters[start:end],
                self.exp_avg[start:end], self.exp_avg_sq[start:end], gradients[start:end]))
        return done

    def update_groups(self, gradients: tuple[Tensor, ...], step: Tensor) -> Tensor:
        """The update on the CPU kernel: one launch per parameter group."""
        done = True
        for group_id in range(len(self.param_groups)):
            start, end = self.group_start_id[group_id], self.group_start_id[group_id + 1]
            tensors = self.parameters[start:end] + self.exp_avg[start:end] + self.exp_avg_sq[start:end] \
                + gradients[start:end]
            inputs = (self.lrs[group_id], self.group_constants[group_id], step) + tensors
            done = ops.depend(done, self.group_kernel(*inputs))
        return done


def param_groups(network: nn.Cell, weight_decay: float,
                 no_decay_names: Sequence[str] = ("cls_token",)) -> list[dict[str, Any]]:
    """Split trainable params into a decayed group and a no-decay group.

    No decay for biases, 1-D params (norm scales/shifts), names containing one of `no_decay_names` and names
    listed by `network.no_weight_decay()` (timm convention) if the network has it. Empty groups are dropped.
    """
    skip = set(no_decay_names)
    if hasattr(network, "no_weight_decay"):
        skip |= set(network.no_weight_decay())
    decay, no_decay = [], []
    for param in network.trainable_params():
        excluded = param.ndim <= 1 or param.name.endswith(".bias") or any(key in param.name for key in skip)
        (no_decay if excluded else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(params_or_network: ParamsOrNetwork, name: str = "adamw", lr: float = 1e-3,
                    weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                    momentum: float = 0.9, nesterov: bool = False,
                    filter_bias_and_bn: bool = True) -> optim.Optimizer:
    """AdamW (decoupled decay, bias-corrected, = torch.optim.AdamW) or SGD with momentum (= torch.optim.SGD).

    A network is turned into `param_groups` when `filter_bias_and_bn` and weight_decay > 0, else its trainable
    params; explicit params or group dicts are passed through. The lr is meant to be driven by `set_lr`.
    """
    name = check_optimizer(name, lr, weight_decay, betas, eps, momentum)
    if isinstance(params_or_network, nn.Cell):
        if filter_bias_and_bn and weight_decay > 0:
            params = param_groups(params_or_network, weight_decay)
        else:
            params = params_or_network.trainable_params()
    else:
        params = list(params_or_network)
    if not params:
        raise ValueError("build_optimizer: there are no trainable parameters to optimize.")
    if name == "adamw":
        optimizer = FusedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        optimizer = optim.SGD(params, lr=lr, momentum=float(momentum), weight_decay=float(weight_decay),
                              nesterov=bool(nesterov))
    # The base class keeps the lr Parameters in a plain list, which MindSpore's compile cache does not bind again
    # when it loads a graph (the step then reads garbage lrs); as a ParameterTuple they are the cell's parameters.
    optimizer.lrs = ParameterTuple(optimizer.lrs)
    return optimizer


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError("expected a mindspore.experimental.optim optimizer (see build_optimizer), "
                        f"got {type(optimizer)}.")


def set_lr(optimizer: optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate; the compiled train step reads it (it is a Parameter)."""
    _check_optimizer(optimizer)
    lr = float(lr)
    if not lr >= 0:  # also rejects NaN
        raise ValueError(f"learning rate must be >= 0, got {lr}.")
    for group in optimizer.param_groups:
        # an in-place write: set_data swaps the tensor object, which an already compiled jit graph can miss
        ops.assign(group["lr"], Tensor(lr, ms.float32))
