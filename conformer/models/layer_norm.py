"""LayerNorm over the last axis on the project's compiled CPU kernel (`conformer/kernels/layer_norm.cc`).

MindSpore 2.10's CPU LayerNorm takes 24x PyTorch's time at Conformer-Ti's shapes (README "Benchmarks"). This cell is
an `nn.LayerNorm` (same parameters, names and checkpoints) whose forward and backward run the project's kernel, which
computes the same with sums in double. It falls back to MindSpore's kernel off the CPU, for other dtypes than
float32, without a C++ compiler, and where a model must run anywhere (`use_builtin_kernels`, for exports).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from conformer.kernels import library


def _shapes(x: list[int], *_: list[int]) -> tuple[list[int], list[int], list[int]]:
    return x, x[:-1], x[:-1]


def _grad_shapes(x: list[int], gamma: list[int], *_: list[int]) -> tuple[list[int], list[int], list[int]]:
    return x, gamma, gamma


def _float32s(*_: object) -> tuple:
    return ms.float32, ms.float32, ms.float32


def layer_norm_kernel() -> ops.Custom | None:
    """(x, gamma, beta, eps[1]) -> (y, mean, rstd), differentiable; None where the kernel cannot be built."""
    path = library("layer_norm")
    if path is None:
        return None
    backward = ops.Custom(f"{path}:LayerNormBackward", out_shape=_grad_shapes, out_dtype=_float32s, func_type="aot")

    def bprop(x: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor, out: tuple, dout: tuple) -> tuple:
        dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(f"{path}:LayerNormForward", out_shape=_shapes, out_dtype=_float32s, func_type="aot",
                      bprop=bprop)


class CpuLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm((dim,), epsilon)` on the project's CPU kernel where it can run (see the module)."""

    def __init__(self, dim: int, epsilon: float) -> None:
        super().__init__((dim,), epsilon=epsilon)
        self.kernel = layer_norm_kernel() if ms.get_context("device_target") == "CPU" else None
        self.eps = Tensor([epsilon], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        return self.kernel(x, self.gamma, self.beta, self.eps)[0]


def use_builtin_kernels(network: nn.Cell) -> int:
    """Switch the network's CPU-kernel cells to MindSpore's own kernels (an export must run without our library);
    returns how many it switched. Call it before the network first runs: a graph compiled earlier keeps its kernel."""
    switched = 0
    for cell in network.cells_and_names():
        if isinstance(cell[1], CpuLayerNorm) and cell[1].kernel is not None:
            cell[1].kernel = None
            switched += 1
    return switched
