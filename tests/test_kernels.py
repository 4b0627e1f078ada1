"""The project's compiled CPU kernels: LayerNorm, BatchNorm, GELU and softmax equal MindSpore's to float32 rounding,
forward and backward, and fall back to MindSpore's kernel where it cannot be built or must not be used."""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from conformer import kernels
from conformer.kernels.cells import (
    CpuAddReLU,
    CpuAttentionCore,
    CpuBatchNorm2d,
    CpuConv2d,
    CpuConv3x3,
    CpuDense,
    CpuGELU,
    CpuLayerNorm,
    CpuMaxPool2d,
    CpuPointwiseConv,
    CpuSoftmax,
    GlobalNorm,
    use_builtin_kernels,
)
from conformer.models.conformer_net import DropPath, FCUDown, FCUUp

from .parity import max_rel_error


class _Loss(nn.Cell):
    """A weighted sum of the cell's output: every element gets its own upstream gradient."""

    def __init__(self, cell: nn.Cell, weights: Tensor) -> None:
        super().__init__()
        self.cell, self.weights = cell, weights

    def construct(self, x: Tensor) -> Tensor:
        return (self.cell(x) * self.weights).sum()


def _value_and_grads(cell: nn.Cell, x: Tensor, weights: Tensor) -> list[np.ndarray]:
    loss = _Loss(cell, weights)
    value, (dx, params) = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=loss.trainable_params()))(x)
    return [value.asnumpy(), cell(x).asnumpy(), dx.asnumpy(), *(g.asnumpy() for g in params)]


NEEDS_COMPILER = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler (g++ or $CXX) to build the kernel: apt install g++")

def _builtin(cell: nn.Cell) -> nn.Cell:
    use_builtin_kernels(cell)
    return cell


class _BatchNormThenRelu(nn.BatchNorm2d):
    """MindSpore's BatchNorm2d and ReLU, as two ops (same parameter names as the BatchNorm)."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.relu(super().construct(x))


# (ours, MindSpore's, input shape[, "relu": inputs with ties]): shapes with more elements than one thread's share,
# and odd ones
CASES = {
    "layer_norm": (lambda: CpuLayerNorm(384, 1e-6), lambda: nn.LayerNorm((384,), epsilon=1e-6), (4, 197, 384)),
    "layer_norm_odd": (lambda: CpuLayerNorm(96, 1e-5), lambda: nn.LayerNorm((96,), epsilon=1e-5), (3, 17, 96)),
    "gelu": (CpuGELU, lambda: nn.GELU(approximate=False), (4, 197, 1536)),
    "gelu_odd": (CpuGELU, lambda: nn.GELU(approximate=False), (3, 7, 13)),
    "softmax": (CpuSoftmax, lambda: nn.Softmax(axis=-1), (4, 6, 197, 197)),
    "softmax_odd": (CpuSoftmax, lambda: nn.Softmax(axis=-1), (2, 3, 5)),
    "dense": (lambda: CpuDense(384, 1536), lambda: nn.Dense(384, 1536), (4, 197, 384)),
    "dense_odd": (lambda: CpuDense(13, 5, has_bias=False), lambda: nn.Dense(13, 5, has_bias=False), (3, 7, 13)),
    "attention": (lambda: CpuAttentionCore(6, 0.125), lambda: _builtin(CpuAttentionCore(6, 0.125)), (4, 197, 1152)),
    "attention_odd": (lambda: CpuAttentionCore(3, 0.7), lambda: _builtin(CpuAttentionCore(3, 0.7)), (2, 5, 36)),
    "pointwise_conv": (lambda: CpuPointwiseConv(64, 256), lambda: nn.Conv2d(64, 256, 1, pad_mode="valid"),
                       (4, 64, 28, 28)),
    "pointwise_conv_odd": (lambda: CpuPointwiseConv(5, 3, has_bias=True),
                           lambda: nn.Conv2d(5, 3, 1, pad_mode="valid", has_bias=True), (1, 5, 7, 9)),
    # 3 images of 40 rows, each in a tile of 35 rows and a short one (the kernel's tiles at these channels and width)
    "conv3x3": (lambda: CpuConv3x3(64, 64), lambda: nn.Conv2d(64, 64, 3, pad_mode="pad", padding=1), (3, 64, 40, 56)),
    "conv3x3_odd": (lambda: CpuConv3x3(5, 3), lambda: nn.Conv2d(5, 3, 3, pad_mode="pad", padding=1), (2, 5, 7, 1)),
    # the stem's 7x7 / 2 (padding 3): 4 x 32 output rows in blocks of 61 (across images, over both cores); the patch
    # embedding's 4x4 / 4 with a bias in one block
    "conv2d_stem": (lambda: CpuConv2d(3, 64, 7, stride=2, padding=3),
                    lambda: nn.Conv2d(3, 64, 7, stride=2, pad_mode="pad", padding=3), (4, 3, 64, 57)),
    "conv2d_patch": (lambda: CpuConv2d(64, 96, 4, stride=4, has_bias=True),
                     lambda: nn.Conv2d(64, 96, 4, stride=4, pad_mode="valid", has_bias=True), (5, 64, 16, 12)),
    "max_pool": (lambda: CpuMaxPool2d(3, 2, 1), lambda: nn.MaxPool2d(3, 2, pad_mode="pad", padding=1), (4, 16, 56, 56)),
    "max_pool_odd": (lambda: CpuMaxPool2d(2, 3, 0), lambda: nn.MaxPool2d(2, 3, pad_mode="pad", padding=0),
                     (2, 3, 7, 8)),
    "max_pool_ties": (lambda: CpuMaxPool2d(3, 2, 1), lambda: nn.MaxPool2d(3, 2, pad_mode="pad", padding=1),
                      (2, 8, 13, 13), "relu"),
    "batch_norm": (lambda: CpuBatchNorm2d(64, 1e-6, 0.9), lambda: nn.BatchNorm2d(64, 1e-6, 0.9), (4, 64, 28, 28)),
    "batch_norm_relu": (lambda: CpuBatchNorm2d(64, 1e-6, 0.9, relu=True),
                        lambda: _BatchNormThenRelu(64, 1e-6, 0.9), (4, 64, 28, 28)),
    "batch_norm_odd": (lambda: CpuBatchNorm2d(3, 1e-5, 0.8), lambda: nn.BatchNorm2d(3, 1e-5, 0.8), (2, 3, 5, 7)),
}


# Where ours measured equal to MindSpore's op (max pool, add + ReLU, drop path's scaled add): a few float32 ulps of the
# largest value, for a machine where the compiler fuses a multiply-add or sums a pooled gradient in another order
EXACT_TOL = 1e-6
# Ours against MindSpore's op, each output's largest error relative to its largest value. Measured here: attention
# 3.0e-6 (y), max pool exactly 0, every other case <= 1.0e-6: ~10x margin. The moving statistics: at most 3% of
# rtol=1e-5, atol=1e-6, so 10x tighter than that.
KERNEL_TOL = {"attention": 3e-5, "max_pool": EXACT_TOL, "max_pool_odd": EXACT_TOL, "max_pool_ties": EXACT_TOL}
DEFAULT_KERNEL_TOL = 1e-5


@NEEDS_COMPILER
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_mindspores_forward_and_backward(case: str) -> None:
    make_ours, make_builtin, shape, *ties = CASES[case]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    x = Tensor(np.maximum(np.round(values), 0) if ties else values)  # ties: whole numbers after a ReLU
    weights = Tensor(rng.standard_normal(make_builtin()(x).shape).astype(np.float32))
    ours, builtin = make_ours().set_train(), make_builtin().set_train()  # BatchNorm: batch statistics
    assert ours.kernel is not None, "the kernel was not built (is g++ installed?)"
    _same_random_parameters(ours, builtin, rng)
    expected = _value_and_grads(builtin, x, weights)
    got = _value_and_grads(ours, x, weights)
    assert len(got) == len(expected)
    tol = KERNEL_TOL.get(case, DEFAULT_KERNEL_TOL)
    for name, mine, want in zip(("loss", "y", "dx", "dparam0", "dparam1"), got, expected):
        np.testing.assert_allclose(mine, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=name)
    for moving in ("moving_mean", "moving_variance") if isinstance(ours, CpuBatchNorm2d) else ():  # two updates each
        want = getattr(builtin, moving).asnumpy()
        assert not np.allclose(want, 0.0 if moving == "moving_mean" else 1.0)
        np.testing.assert_allclose(getattr(ours, moving).asnumpy(), want, rtol=1e-6, atol=1e-7, err_msg=moving)
    assert [p.name for p in ours.get_parameters()] == [p.name for p in builtin.get_parameters()]  # checkpoints

    portable, builtin = make_ours().set_train(), make_builtin().set_train()  # what an export does, before compiling
    assert use_builtin_kernels(portable) >= 1
    assert all(getattr(cell, "kernel", None) is None for _, cell in portable.cells_and_names())
    _same_random_parameters(portable, builtin, rng)
    portable_y = portable(x)
    if isinstance(portable, CpuBatchNorm2d) and portable.relu:  # without its kernel the caller applies the ReLU
        portable_y = ops.relu(portable_y)
    np.testing.assert_array_equal(portable_y.asnumpy(), builtin(x).asnumpy())


@NEEDS_COMPILER
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_inference_kernel_equals_mindspores(relu: bool) -> None:
    """In eval mode the moving statistics normalise, forward and backward (gradients through a frozen BatchNorm);
    with `relu` the ReLU after it too."""
    rng = np.random.default_rng(1)
    x = Tensor((rng.standard_normal((3, 16, 9, 11)) * 2 + 0.5).astype(np.float32))
    weights = Tensor(rng.standard_normal((3, 16, 9, 11)).astype(np.float32))
    ours = CpuBatchNorm2d(16, 1e-5, 0.9, relu=relu).set_train(False)
    builtin = (_BatchNormThenRelu if relu else nn.BatchNorm2d)(16, 1e-5, 0.9).set_train(False)
    assert ours.inference_kernel is not None
    _same_random_parameters(ours, builtin, rng)
    for moving, low in (("moving_mean", -1.0), ("moving_variance", 0.2)):
        value = Tensor(rng.uniform(low, 2.0, 16).astype(np.float32))
        getattr(ours, moving).set_data(value)
        getattr(builtin, moving).set_data(value)
    for name, mine, want in zip(("loss", "y", "dx", "dgamma", "dbeta"), _value_and_grads(ours, x, weights),
                                _value_and_grads(builtin, x, weights)):  # measured <= 2.3e-7 of the largest: 10x
        np.testing.assert_allclose(mine, want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=name)


# Normalisation inputs where a misplaced constant shows: one row (LayerNorm) or channel (BatchNorm) per (mean, std).
# Variances from 1e-8 to 1e4: at 1e-6 and 1e-5 the epsilon is as large as the variance (eps outside the square root,
# or added twice, is off by tens of percent), at the top it is nothing; means up to 1e3 times the std (a variance as
# E[x^2] - E[x]^2 in float32 cancels). Means above ~1e3 std are not used: float32 cannot hold their mean to better
# than ~6e-8 * |mean| / std of the normalised output on any path.
NORM_STATS = ((0.0, 1e-4), (0.01, 3e-4), (0.0, 1e-3), (-0.02, 3e-3), (0.0, 1e-2), (1.0, 1.0), (30.0, 0.3), (30.0, 3.0),
              (-300.0, 3.0), (-300.0, 30.0), (1000.0, 10.0), (1000.0, 100.0))
# Both paths against the float64 definition, each output relative to its row's / channel's largest value. Measured on
# both paths: LayerNorm <= 1.4e-6 (y), BatchNorm <= 1.8e-6 (dgamma), the moving statistics <= 1.5e-7: ~10x margin.
# (LayerNorm's eps moved outside the square root in the kernel: 0.94.)
NORM_TOL = 2e-5


def _relative_errors(got: np.ndarray, want: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """|got - want| at its largest per row (LayerNorm) or channel (BatchNorm), over that slice's largest |want|."""
    return np.abs(got - want).max(axis=axis) / np.abs(want).max(axis=axis)


def _layer_norm_definition(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray,
                           eps: float) -> list[np.ndarray]:
    """y, dx, dgamma, dbeta of LayerNorm over the last axis, in float64: (x - mean) / sqrt(var + eps) * gamma + beta."""
    x, gamma, dy = x.astype(np.float64), gamma.astype(np.float64), dy.astype(np.float64)
    centred = x - x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    g = dy * gamma
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return [xhat * gamma + beta, dx, (dy * xhat).sum(rows), dy.sum(rows)]


@pytest.mark.parametrize("builtin", [False, True], ids=["kernel", "mindspore"])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layer_norm_equals_its_definition_at_low_variance_and_large_mean(eps: float, builtin: bool) -> None:
    """Forward and backward of CpuLayerNorm, on the project's kernel and on MindSpore's op, against the float64
    definition on rows whose variance ranges from far below eps to far above, and whose mean is up to 1e3 stds."""
    rng = np.random.default_rng(8)
    d = 96
    x = np.stack([mean + std * rng.standard_normal(d) for mean, std in NORM_STATS]).reshape(2, 6, d)
    x = x.astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = (0.5 * rng.standard_normal(d) + 1).astype(np.float32)
    beta = rng.standard_normal(d).astype(np.float32)
    cell = CpuLayerNorm(d, eps)
    assert cell.kernel is not None
    if builtin:
        assert use_builtin_kernels(cell) == 1
    cell.gamma.set_data(Tensor(gamma))
    cell.beta.set_data(Tensor(beta))
    _, y, dx, dgamma, dbeta = _value_and_grads(cell, Tensor(x), Tensor(dy))
    want = _layer_norm_definition(x, gamma, beta, dy, eps)
    errors = {"y": _relative_errors(y, want[0], -1).max(), "dx": _relative_errors(dx, want[1], -1).max(),
              "dgamma": _relative_errors(dgamma, want[2], 0), "dbeta": _relative_errors(dbeta, want[3], 0)}
    assert max(errors.values()) < NORM_TOL, errors


def _batch_norm_definition(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray, eps: float,
                           statistics: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """y, dx, dgamma, dbeta of BatchNorm over N, H, W in float64: with the batch's mean and biased variance, or with
    the given (mean, variance) held fixed (inference)."""
    x, gamma, dy = x.astype(np.float64), gamma.astype(np.float64)[:, None, None], dy.astype(np.float64)
    axes = (0, 2, 3)
    if statistics is None:
        mean, variance = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    else:
        mean, variance = (s.astype(np.float64)[:, None, None] for s in statistics)
    rstd = 1.0 / np.sqrt(variance + eps)
    xhat = (x - mean) * rstd
    g = dy * gamma
    if statistics is None:
        dx = rstd * (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
    else:
        dx = rstd * g
    return [xhat * gamma + beta[:, None, None], dx, (dy * xhat).sum(axes), dy.sum(axes)]


def _batch_norm_case(builtin: bool, eps: float, rng: np.random.Generator) -> tuple:
    """A CpuBatchNorm2d (momentum 0.9; on MindSpore's op with `builtin`) with random gamma and beta and moving
    statistics away from their defaults; x [4, C, 6, 5] with one (mean, std) of NORM_STATS per channel, and an
    upstream gradient."""
    channels = len(NORM_STATS)
    mean, std = (np.array(column, np.float64) for column in zip(*NORM_STATS))
    x = (mean[:, None, None] + std[:, None, None] * rng.standard_normal((4, channels, 6, 5))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cell = CpuBatchNorm2d(channels, eps, 0.9)
    assert cell.kernel is not None and cell.inference_kernel is not None
    if builtin:
        assert use_builtin_kernels(cell) == 1
    values = {"gamma": 0.5 * rng.standard_normal(channels) + 1, "beta": rng.standard_normal(channels),
              # near the true statistics, not at 0 and 1: a swapped or missing moving statistic shows
              "moving_mean": mean + std * rng.uniform(-0.5, 0.5, channels),
              "moving_variance": std ** 2 * rng.uniform(0.5, 2.0, channels)}
    for name, value in values.items():
        getattr(cell, name).set_data(Tensor(value.astype(np.float32)))
    return cell, x, dy, *(values[name].astype(np.float32) for name in values)


@pytest.mark.parametrize("builtin", [False, True], ids=["kernel", "mindspore"])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_batch_norm_training_equals_its_definition_at_low_variance_and_large_mean(eps: float, builtin: bool) -> None:
    """Training mode on the project's kernel and on MindSpore's op: forward and backward with the batch statistics
    against the float64 definition, and the moving statistics' update with momentum 0.9 (the moving value's weight;
    the batch variance unbiased) from values away from their defaults."""
    cell, x, dy, gamma, beta, moving_mean, moving_variance = _batch_norm_case(builtin, eps, np.random.default_rng(9))
    cell.set_train()
    _, y, dx, dgamma, dbeta = _value_and_grads(cell, Tensor(x), Tensor(dy))  # two forward passes: two updates
    want = _batch_norm_definition(x, gamma, beta, dy, eps)
    errors = {"y": _relative_errors(y, want[0], (0, 2, 3)).max(), "dx": _relative_errors(dx, want[1], (0, 2, 3)).max(),
              "dgamma": _relative_errors(dgamma, want[2], 0), "dbeta": _relative_errors(dbeta, want[3], 0)}
    batch_mean = x.astype(np.float64).mean((0, 2, 3))
    batch_variance = x.astype(np.float64).var((0, 2, 3), ddof=1)
    for name, moving, batch in (("moving_mean", moving_mean, batch_mean),
                                ("moving_variance", moving_variance, batch_variance)):
        want_moving = 0.81 * moving + 0.19 * batch  # 0.9 * (0.9 * moving + 0.1 * batch) + 0.1 * batch
        errors[name] = (np.abs(getattr(cell, name).asnumpy() - want_moving) / np.abs(want_moving)).max()
    assert max(errors.values()) < NORM_TOL, errors


@pytest.mark.parametrize("builtin", [False, True], ids=["kernel", "mindspore"])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_batch_norm_inference_equals_its_definition_at_low_variance_and_large_mean(eps: float, builtin: bool) -> None:
    """Eval mode on the project's kernel and on MindSpore's op: the moving statistics (shifted means, variances from
    1e-8 up) normalise, forward and backward, against the float64 definition; they stay as they were."""
    cell, x, dy, gamma, beta, moving_mean, moving_variance = _batch_norm_case(builtin, eps, np.random.default_rng(10))
    cell.set_train(False)
    _, y, dx, dgamma, dbeta = _value_and_grads(cell, Tensor(x), Tensor(dy))
    want = _batch_norm_definition(x, gamma, beta, dy, eps, (moving_mean, moving_variance))
    errors = {"y": _relative_errors(y, want[0], (0, 2, 3)).max(), "dx": _relative_errors(dx, want[1], (0, 2, 3)).max(),
              "dgamma": _relative_errors(dgamma, want[2], 0), "dbeta": _relative_errors(dbeta, want[3], 0)}
    assert max(errors.values()) < NORM_TOL, errors
    np.testing.assert_array_equal(cell.moving_mean.asnumpy(), moving_mean)
    np.testing.assert_array_equal(cell.moving_variance.asnumpy(), moving_variance)


def _gelu_definition(x: np.ndarray, dy: np.ndarray) -> list[np.ndarray]:
    """Exact GELU x * Phi(x) and its input gradient in float64."""
    x = x.astype(np.float64)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return [x * cdf, dy * (cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))]


def _softmax_definition(x: np.ndarray, dy: np.ndarray) -> list[np.ndarray]:
    """Softmax over the last axis and its input gradient in float64."""
    e = np.exp(x - x.max(-1, keepdims=True).astype(np.float64))
    y = e / e.sum(-1, keepdims=True)
    return [y, y * (dy - (dy * y).sum(-1, keepdims=True))]


def _attention_definition(qkv: np.ndarray, dy: np.ndarray, heads: int, scale: float) -> list[np.ndarray]:
    """softmax(scale q k^T) v per head from [B, N, 3C] (q, k, v side by side, heads side by side in each), and the
    gradient of qkv, in float64."""
    b, n, c3 = qkv.shape
    d = c3 // 3 // heads
    q, k, v = qkv.astype(np.float64).reshape(b, n, 3, heads, d).transpose(2, 0, 3, 1, 4)  # each [B, H, N, D]
    attn = _softmax_definition(scale * q @ k.transpose(0, 1, 3, 2), np.zeros((b, heads, n, n)))[0]
    dout = dy.astype(np.float64).reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    dv = attn.transpose(0, 1, 3, 2) @ dout
    dscores = _softmax_definition(scale * q @ k.transpose(0, 1, 3, 2), dout @ v.transpose(0, 1, 3, 2))[1]
    dq, dk = scale * dscores @ k, scale * dscores.transpose(0, 1, 3, 2) @ q
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b, n, c3)
    return [(attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c3 // 3), dqkv]


# (cell, input, definition): GELU out to its tails (|x| up to 12), softmax rows offset by up to 1e3 (exp overflows
# without the max subtracted) with spreads from 1e-3 to 30, attention with a scale that is not 1 / sqrt(head_dim)
_RNG = np.random.default_rng(14)
DEFINITIONS = {
    "gelu": (CpuGELU, np.linspace(-12, 12, 2 * 3 * 101).reshape(2, 3, 101), _gelu_definition),
    "softmax": (CpuSoftmax, (_RNG.standard_normal((3, 6, 33)) * np.geomspace(1e-3, 30, 6)[:, None]
                             + np.array([0.0, 1e3, -1e3])[:, None, None]), _softmax_definition),
    "attention": (lambda: CpuAttentionCore(3, 0.3), _RNG.standard_normal((2, 7, 3 * 24)) * 2,
                  lambda x, dy: _attention_definition(x, dy, 3, 0.3)),
}
# each output's largest error relative to its largest value, on both paths; measured (kernel / MindSpore's ops):
# GELU 7.4e-8 / 2.3e-7, softmax 6.9e-8 / 3.6e-7, attention 2.3e-7 / 1.0e-6 (dx): ~10x margin
DEFINITION_TOL = {"gelu": 2e-6, "softmax": 4e-6, "attention": 1e-5}


@pytest.mark.parametrize("builtin", [False, True], ids=["kernel", "mindspore"])
@pytest.mark.parametrize("case", DEFINITIONS)
def test_activation_and_attention_equal_their_float64_definitions(case: str, builtin: bool) -> None:
    """GELU, softmax and the attention core, forward and input gradient, on the project's kernel and on MindSpore's
    ops, against float64 definitions written out here (the attention's MindSpore path is the project's own code: no
    other test sees its scale or head layout except against the kernel)."""
    make, x, definition = DEFINITIONS[case]
    x = x.astype(np.float32)
    dy = np.random.default_rng(15).standard_normal(make()(Tensor(x)).shape).astype(np.float32)
    cell = make()
    assert cell.kernel is not None
    if builtin:
        assert use_builtin_kernels(cell) >= 1
    _, y, dx = _value_and_grads(cell, Tensor(x), Tensor(dy))
    want = definition(x, dy)
    errors = {"y": max_rel_error(y, want[0]), "dx": max_rel_error(dx, want[1])}
    assert max(errors.values()) < DEFINITION_TOL[case], errors


class _NormedHeads(nn.Cell):
    """conv -> BatchNorm + ReLU -> conv -> BatchNorm -> two heads: a train step with two moving-statistics updates."""

    def __init__(self, builtin: bool) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)  # no bias: BN makes its gradient noise
        self.bn1, self.bn2 = CpuBatchNorm2d(8, 1e-5, 0.9, relu=True), CpuBatchNorm2d(8, 1e-5, 0.8)
        self.head_a, self.head_b = nn.Dense(8, 5), nn.Dense(8, 5)
        if builtin:
            assert use_builtin_kernels(self) == 2

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.bn1(self.conv1(x))  # relu=True: the cell applies the ReLU on either kernel
        h = self.bn2(self.conv2(h)).mean(axis=(2, 3))
        return self.head_a(h), self.head_b(h)


@NEEDS_COMPILER
def test_batch_norm_kernel_updates_the_moving_statistics_over_train_steps_like_mindspores() -> None:
    """The forward kernel updates the moving statistics in place: over several compiled train steps, with an eval
    pass between them that reads them, they follow MindSpore's BatchNorm (and so do the losses)."""
    from conformer.train.losses import DualHeadLoss
    from conformer.train.optim import build_optimizer
    from conformer.train.step import TrainStep

    rng = np.random.default_rng(6)
    nets = _NormedHeads(builtin=False), _NormedHeads(builtin=True)
    assert nets[0].bn1.kernel is not None
    _same_random_parameters(*nets, rng)
    steps = [TrainStep(net, DualHeadLoss(), build_optimizer(net, lr=0.01)) for net in nets]
    for index in range(4):
        x = Tensor((rng.standard_normal((6, 3, 9, 9)) * 2 + index).astype(np.float32))
        y = Tensor(rng.integers(0, 5, 6).astype(np.int32))
        losses = [step(x, y).loss for step in steps]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # measured <= 1.0e-7
        # float32 rounding grows over the steps (AdamW's first updates amplify it): measured <= 2.1e-6 of the largest
        # value by the fourth step, eval logits <= 1.5e-6; a missed or stale update of the moving statistics would be
        # off by a tenth of a batch statistic
        for name in ("bn1.moving_mean", "bn1.moving_variance", "bn2.moving_mean", "bn2.moving_variance"):
            mine, want = (dict(net.parameters_and_names())[name].asnumpy() for net in nets)
            np.testing.assert_allclose(mine, want, rtol=0, atol=2e-5 * np.abs(want).max(),
                                       err_msg=f"{name} after step {index + 1}")
        evals = []
        for net in nets:
            net.set_train(False)
            evals.append(net(x)[0].asnumpy())
        np.testing.assert_allclose(evals[0], evals[1], rtol=0, atol=2e-5 * np.abs(evals[1]).max())


class _ResidualEnd(nn.Cell):
    """relu(conv(x) + x): a block's end, where x's gradient comes through both inputs of the add."""

    def __init__(self, builtin: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 1, has_bias=True)
        self.add_relu = CpuAddReLU()
        if builtin:
            assert use_builtin_kernels(self) == 1

    def construct(self, x: Tensor) -> Tensor:
        return self.add_relu(self.conv(x), x)


@NEEDS_COMPILER
def test_add_relu_kernel_equals_mindspores_add_and_relu() -> None:
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((3, 6, 40, 37)).astype(np.float32))
    weights = Tensor(rng.standard_normal((3, 6, 40, 37)).astype(np.float32))
    ours, builtin = _ResidualEnd(builtin=False), _ResidualEnd(builtin=True)
    assert ours.add_relu.kernel is not None
    _same_random_parameters(ours, builtin, rng)
    got, want = _value_and_grads(ours, x, weights), _value_and_grads(builtin, x, weights)
    assert 0.2 < (got[1] == 0).mean() < 0.8
    for name, mine, expected in zip(("loss", "y", "dx", "dw", "db"), got, want):  # measured: equal (EXACT_TOL)
        np.testing.assert_allclose(mine, expected, rtol=0, atol=EXACT_TOL * np.abs(expected).max(), err_msg=name)


class _DropPathResidual(nn.Cell):
    """x + drop_path(dense(x)) with a given per-sample mask (a dropped sample, kept ones scaled by 2)."""

    def __init__(self, builtin: bool) -> None:
        super().__init__()
        self.dense = nn.Dense(12, 12)
        self.drop_path = DropPath(0.5)
        self.mask = Tensor(np.array([2.0, 0.0, 2.0, 2.0], np.float32))
        if builtin:
            assert use_builtin_kernels(self) == 1

    def construct(self, x: Tensor) -> Tensor:
        return self.drop_path(self.dense(x), self.mask, x)


@NEEDS_COMPILER
def test_drop_path_residual_kernel_equals_mindspores_multiply_and_add() -> None:
    rng = np.random.default_rng(7)
    x = Tensor(rng.standard_normal((4, 33, 12)).astype(np.float32))
    weights = Tensor(rng.standard_normal((4, 33, 12)).astype(np.float32))
    ours, builtin = _DropPathResidual(builtin=False).set_train(), _DropPathResidual(builtin=True).set_train()
    assert ours.drop_path.scaled_add.kernel is not None
    _same_random_parameters(ours, builtin, rng)
    got, want = _value_and_grads(ours, x, weights), _value_and_grads(builtin, x, weights)
    np.testing.assert_array_equal(got[1][1], x.asnumpy()[1])  # the dropped sample: the residual alone
    for name, mine, expected in zip(("loss", "y", "dx", "dw", "db"), got, want):  # measured: equal (EXACT_TOL)
        np.testing.assert_allclose(mine, expected, rtol=0, atol=EXACT_TOL * np.abs(expected).max(), err_msg=name)


@NEEDS_COMPILER
def test_max_pool_kernel_lets_the_first_nan_win_like_mindspores() -> None:
    rng = np.random.default_rng(4)
    x = np.round(rng.standard_normal((2, 3, 9, 9))).astype(np.float32)
    x[0, 0, 2, 3] = x[0, 1, 0, 0] = x[1, 2, 4, 4] = x[1, 2, 4, 5] = x[1, 2, 5, 3] = np.nan
    ours = CpuMaxPool2d(3, 2, 1)
    assert ours.kernel is not None
    got, indices = (out.asnumpy() for out in ours.kernel(Tensor(x), ours.geometry))
    want = nn.MaxPool2d(3, 2, pad_mode="pad", padding=1)(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, want)  # NaN where MindSpore has NaN
    assert np.isnan(got).sum() == 8
    # the winner of an output with two NaNs in its window ([1, 2, 4, 4] and [1, 2, 4, 5]) is the first in row order
    assert indices[1, 2, 2, 2] == 4 * 9 + 4


def _first_maxima(x: np.ndarray, k: int, stride: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-pooling by its definition: per window the first maximum in row-major order (a NaN above any number, the
    first NaN above later ones), padding never taken; the values and their indices in the H x W plane."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    values, indices = np.empty((n, c, ho, wo), np.float32), np.empty((n, c, ho, wo), np.int64)
    for b, ch, i, j in np.ndindex(n, c, ho, wo):
        rows = range(max(i * stride - padding, 0), min(i * stride - padding + k, h))
        columns = range(max(j * stride - padding, 0), min(j * stride - padding + k, w))
        cells = [(r, q) for r in rows for q in columns]  # row-major window order
        nans = [cell for cell in cells if np.isnan(x[b, ch, cell[0], cell[1]])]
        r, q = nans[0] if nans else max(cells, key=lambda cell: (x[b, ch, cell[0], cell[1]], -cells.index(cell)))
        values[b, ch, i, j], indices[b, ch, i, j] = x[b, ch, r, q], r * w + q
    return values, indices


class _PoolWithIndices(nn.Cell):
    def __init__(self, pool: CpuMaxPool2d) -> None:
        super().__init__()
        self.pool = pool

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pool.kernel(x, self.pool.geometry)


@NEEDS_COMPILER
@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 3, 0), (3, 1, 1), (5, 2, 2), (4, 4, 0)])
def test_max_pool_kernel_takes_the_first_maximum_of_each_window(geometry: tuple[int, int, int]) -> None:
    """Ties (whole numbers), NaNs and -inf (a plane of -inf must not pick a padding cell) against the definition."""
    rng = np.random.default_rng(5)
    x = np.round(rng.standard_normal((2, 3, 11, 10))).astype(np.float32)
    x[0, 1] = -np.inf
    x[1, 0, rng.integers(0, 11, 6), rng.integers(0, 10, 6)] = np.nan
    x[1, 2, :3] = -np.inf
    ours = _PoolWithIndices(CpuMaxPool2d(*geometry))
    assert ours.pool.kernel is not None
    got, indices = (out.asnumpy() for out in ours(Tensor(x)))  # a graph: the op's own output shape
    want, want_indices = _first_maxima(x, *geometry)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(indices, want_indices)


@NEEDS_COMPILER
def test_global_norm_kernel_equals_the_sum_of_squares() -> None:
    """The gradients' global norm in one op: the same value as a square and a sum per tensor, and an inf or a NaN
    anywhere comes through (the train step's overflow check reads it)."""
    rng = np.random.default_rng(3)
    tensors = [rng.standard_normal(shape).astype(np.float32) * 10 for shape in
               ((384, 1536), (1536,), (64, 3, 7, 7), (1,), (70000,), (5, 5))]
    ours, builtin = GlobalNorm(), GlobalNorm(float32=False)
    assert ours.kernel is not None and builtin.kernel is None
    want = float(np.sqrt(sum(np.square(t.astype(np.float64)).sum() for t in tensors)))
    for cell in (ours, builtin):
        got = cell(tuple(Tensor(t) for t in tensors))
        assert got.shape == () and float(got) == pytest.approx(want, rel=1e-6)
    for bad in (np.inf, np.nan):
        broken = [t.copy() for t in tensors]
        broken[4][123] = bad
        assert not np.isfinite(float(ours(tuple(Tensor(t) for t in broken))))


class _TwoGeometries(nn.Cell):
    """Cells of one kernel with different geometries in one graph (pool sizes, head counts): MindSpore keys a custom
    op by its function name, and each cell must still keep its own output shape."""

    def __init__(self, ours: bool) -> None:
        super().__init__()
        pool = CpuMaxPool2d if ours else _pool
        self.pool_a, self.pool_b = pool(3, 2, 1), pool(2, 2, 0)
        self.attention_a = CpuAttentionCore(2, 0.5) if ours else _builtin(CpuAttentionCore(2, 0.5))
        self.attention_b = CpuAttentionCore(3, 0.25) if ours else _builtin(CpuAttentionCore(3, 0.25))

    def construct(self, x: Tensor) -> Tensor:
        y = self.pool_b(self.pool_a(x))  # [B, 6, 2, 2]
        tokens = y.reshape(y.shape[0], 4, 6)
        return self.attention_a(tokens).sum() + self.attention_b(ops.tile(tokens, (1, 1, 3))).sum()  # 2 and 3 heads


def _pool(k: int, stride: int, padding: int) -> nn.Cell:
    return nn.MaxPool2d(k, stride, pad_mode="pad", padding=padding)


@NEEDS_COMPILER
def test_cells_of_one_kernel_with_different_geometries_in_one_graph() -> None:
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((2, 6, 8, 8)).astype(np.float32))
    ours, builtin = _TwoGeometries(ours=True), _TwoGeometries(ours=False)
    got, want = _value_and_grads(ours, x, Tensor(1.0)), _value_and_grads(builtin, x, Tensor(1.0))
    for mine, expected in zip(got, want):  # measured <= 2.1e-7 of the largest: 10x
        np.testing.assert_allclose(mine, expected, rtol=0, atol=2e-6 * max(np.abs(expected).max(), 1e-6))


class _FeatureCoupling(nn.Cell):
    """Conformer's couplings: a feature map to tokens (FCUDown, whose class token comes from the map too) and back
    (FCUUp), the 1x1 convs and transposes in one op each on the CPU kernels, in MindSpore's ops with `builtin`."""

    def __init__(self, builtin: bool) -> None:
        super().__init__()
        self.down, self.up = FCUDown(16, 12, dw_stride=2), FCUUp(12, 16, up_stride=2)
        if builtin:
            assert use_builtin_kernels(self) >= 4

    def construct(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        cls_token = ops.tile(x.mean(axis=(2, 3), keep_dims=True).reshape(b, 1, 16)[:, :, :12], (1, 17, 1))
        tokens = self.down(x, cls_token)  # [B, 1 + 4 * 4, 12]
        return self.up(tokens * tokens, 4, 4) * x


@NEEDS_COMPILER
def test_feature_couplings_on_the_token_kernels_equal_mindspores_ops() -> None:
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((3, 16, 8, 8)).astype(np.float32))
    weights = Tensor(rng.standard_normal((3, 16, 8, 8)).astype(np.float32))
    ours, builtin = _FeatureCoupling(builtin=False).set_train(), _FeatureCoupling(builtin=True).set_train()
    assert ours.down.to_tokens is not None and ours.up.from_tokens is not None
    _same_random_parameters(ours, builtin, rng)
    got, want = _value_and_grads(ours, x, weights), _value_and_grads(builtin, x, weights)
    assert len(got) == len(want) == 3 + len(ours.trainable_params())
    names = ["loss", "y", "dx", *(param.name for param in ours.trainable_params())]
    for name, mine, expected in zip(names, got, want):
        if name.endswith("up.conv_project.bias"):  # it feeds a training-mode BatchNorm: 0 in exact arithmetic, noise
            assert max(np.abs(mine).max(), np.abs(expected).max()) < 1e-5, name  # on both sides (measured 3.6e-7)
            continue
        # measured <= 3.1e-7 of the largest: 10x
        np.testing.assert_allclose(mine, expected, rtol=0, atol=3e-6 * np.abs(expected).max(), err_msg=name)


def _same_random_parameters(ours: nn.Cell, builtin: nn.Cell, rng: np.random.Generator) -> None:
    theirs = dict(builtin.parameters_and_names())
    for name, param in ours.parameters_and_names():
        if "moving" not in name:  # a copy each: a train step updates its own in place
            value = rng.standard_normal(param.shape).astype(np.float32)
            param.set_data(Tensor(value.copy()))
            theirs[name].set_data(Tensor(value.copy()))


def test_without_a_compiler_the_builtin_kernel_is_used(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            norm = CpuLayerNorm(8, 1e-6)
        assert norm.kernel is None and "no C++ compiler" in caplog.text
        x = Tensor(np.arange(16, dtype=np.float32).reshape(2, 8))
        np.testing.assert_array_equal(norm(x).asnumpy(), nn.LayerNorm((8,), epsilon=1e-6)(x).asnumpy())
    finally:
        kernels.library.cache_clear()


def test_without_a_compiler_auto_falls_back_and_project_is_refused_naming_the_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    kernels.library.cache_clear()
    kernels.build_all.cache_clear()
    try:
        assert kernels.select("auto") == "project" and not kernels.serves("layer_norm")  # each cell: MindSpore's
        with pytest.raises(RuntimeError, match=r"kernels=project: the CPU kernels .*layer_norm.* cannot be built"):
            kernels.select("project")
        assert kernels.select("mindspore") == "mindspore"
    finally:
        kernels.library.cache_clear()
        kernels.build_all.cache_clear()


@NEEDS_COMPILER
def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        path = kernels.library("layer_norm")
        assert path is not None and path.parent == tmp_path / "conformer" / "kernels" and path.is_file()
        built = path.stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library("layer_norm") == path and path.stat().st_mtime_ns == built  # found, not rebuilt
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    finally:
        kernels.library.cache_clear()


@NEEDS_COMPILER
def test_a_first_run_builds_every_kernel_into_an_empty_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    kernels.build_all.cache_clear()
    try:
        assert kernels.build_all() == []  # none failed
        built = sorted(path.name.split("-")[0] for path in (tmp_path / "conformer" / "kernels").iterdir())
        assert built == sorted(path.stem for path in kernels.SOURCES.glob("*.cc"))  # one library each, no leftovers
    finally:
        kernels.library.cache_clear()
        kernels.build_all.cache_clear()


@NEEDS_COMPILER
def test_an_unwritable_cache_falls_back_to_the_builtin_kernel(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert kernels.library("layer_norm") is None
        assert "cannot build the layer_norm kernel" in caplog.text and "XDG_CACHE_HOME" in caplog.text
    finally:
        kernels.library.cache_clear()


@NEEDS_COMPILER
def test_the_kernel_pool_takes_its_thread_count_from_the_environment() -> None:
    """CONFORMER_KERNEL_THREADS sets the kernels' thread count (the launcher divides the cores among msrun workers
    with it). With 4 threads on any machine, more than this one's 2 cores, ranges split into 2 to 4 chunks and idle
    workers skip a region: the kernels still equal MindSpore's, and the pool holds exactly 3 threads more than with
    1 thread."""
    cases = ["batch_norm", "batch_norm_odd", "gelu", "dense", "conv3x3", "conv2d_stem", "max_pool", "pointwise_conv"]
    procs = {threads: subprocess.Popen([sys.executable, "-m", "tests.kernel_threads_probe", *cases],
                                       cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "CONFORMER_KERNEL_THREADS": str(threads)})
             for threads in (1, 4)}
    counts = {}
    for threads, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        counts[threads] = int(re.search(r"^threads (\d+)$", output, re.MULTILINE)[1])
    assert counts[4] - counts[1] == 3, counts
