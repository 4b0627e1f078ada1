"""The project's compiled CPU kernels (`conformer/kernels/*.cc`) as MindSpore `ops.Custom` operators, each with its
output shape and, where it trains, its backward. The cells that use them are `conformer.kernels.cells`."""
from __future__ import annotations

from typing import Callable

import mindspore as ms
from mindspore import Tensor, ops

from conformer.kernels import library, serves


def _float32s(*inputs: object) -> object:
    return ms.float32


def _custom(name: str, function: str, out_shape: Callable, outputs: int = 1,
            bprop: Callable | None = None) -> ops.Custom:
    """`function` of the compiled `<name>.cc` as an op whose outputs are all float32."""
    dtypes = (lambda *_: (ms.float32,) * outputs) if outputs > 1 else _float32s
    return ops.Custom(f"{library(name)}:{function}", out_shape=out_shape, out_dtype=dtypes, func_type="aot",
                      bprop=bprop)


def _same_shape(x: list[int], *_: list[int]) -> list[int]:
    return x


def layer_norm_kernel() -> ops.Custom:
    """(x, gamma, beta, eps[1]) -> (y, mean, rstd), differentiable."""
    backward = _custom("layer_norm", "LayerNormBackward", lambda x, gamma, *_: (x, gamma, gamma), outputs=3)

    def bprop(x: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor, out: tuple, dout: tuple) -> tuple:
        dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0])
        return dx, dgamma, dbeta, ops.zeros_like(eps)

    return _custom("layer_norm", "LayerNormForward", lambda x, *_: (x, x[:-1], x[:-1]), outputs=3, bprop=bprop)


def batch_norm_kernel(relu: bool = False) -> ops.Custom:
    """(x [N, C, ...], gamma, beta, moving mean, moving variance, [eps, momentum]) -> (y, batch mean, rstd), with
    the moving mean and variance updated in place; differentiable with respect to x, gamma and beta; with `relu`
    y = max(BatchNorm(x), 0)."""
    name = "BatchNormRelu" if relu else "BatchNorm"
    backward = _custom("batch_norm", f"{name}Backward", lambda x, gamma, *_: (x, gamma, gamma), outputs=3)

    def bprop(x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_variance: Tensor,
              constants: Tensor, out: tuple, dout: tuple) -> tuple:
        if relu:
            dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0], out[0])
        else:
            dx, dgamma, dbeta = backward(x, gamma, out[1], out[2], dout[0])
        return (dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance),
                ops.zeros_like(constants))

    return _custom("batch_norm", f"{name}Forward", lambda x, gamma, *_: (x, gamma, gamma), outputs=3, bprop=bprop)


def batch_norm_inference_kernel(relu: bool = False) -> ops.Custom:
    """(x [N, C, ...], gamma, beta, moving mean, moving variance, [eps, momentum]) -> y normalised with the moving
    statistics, differentiable with respect to x, gamma and beta; with `relu` y = max(BatchNorm(x), 0)."""
    name = "BatchNormRelu" if relu else "BatchNorm"
    backward = _custom("batch_norm", f"{name}InferenceBackward", lambda x, gamma, *_: (x, gamma, gamma), outputs=3)

    def bprop(x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_variance: Tensor,
              constants: Tensor, out: Tensor, dout: Tensor) -> tuple:
        if relu:
            dx, dgamma, dbeta = backward(x, gamma, moving_mean, moving_variance, constants, dout, out)
        else:
            dx, dgamma, dbeta = backward(x, gamma, moving_mean, moving_variance, constants, dout)
        return (dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance),
                ops.zeros_like(constants))

    return _custom("batch_norm", f"{name}Inference", _same_shape, bprop=bprop)


def _weighted_kernel(name: str, function: str, out_shape: Callable, bias: bool) -> ops.Custom:
    """`<function>Forward` of `<name>.cc`, (x, w, b) -> y or (x, w) -> y without a bias, with its backward
    `<function>Backward` -> (dx, dw[, db]); each arity has its own entry points (`...NoBias`) and bprop name, as
    MindSpore keys both by name."""
    suffix = "" if bias else "NoBias"
    if bias:
        backward = _custom(name, f"{function}Backward", lambda x, w, dy: (x, w, w[:1]), outputs=3)

        def bprop_with_bias(x: Tensor, w: Tensor, b: Tensor, out: Tensor, dout: Tensor) -> tuple:
            return backward(x, w, dout)

        bprop = bprop_with_bias
    else:
        backward = _custom(name, f"{function}BackwardNoBias", lambda x, w, dy: (x, w), outputs=2)

        def bprop(x: Tensor, w: Tensor, out: Tensor, dout: Tensor) -> tuple:
            return backward(x, w, dout)

    return _custom(name, f"{function}Forward{suffix}", out_shape, bprop=bprop)


def dense_kernel(bias: bool) -> ops.Custom:
    """(x [..., k], w [n, k], b [n]) -> x w^T + b, or (x, w) -> x w^T without a bias; differentiable."""
    return _weighted_kernel("dense", "Dense", lambda x, w, *_: x[:-1] + w[:1], bias)


def attention_kernel(num_heads: int) -> ops.Custom:
    """(qkv [B, N, 3C], scale[1]) -> (softmax(scale q k^T) v per head as [B, N, C], the probabilities
    [B, H, N, N]), differentiable with respect to qkv."""
    backward = _custom("attention", "AttentionBackward", lambda qkv, *_: qkv)

    def bprop(qkv: Tensor, scale: Tensor, out: tuple, dout: tuple) -> tuple:
        return backward(qkv, out[1], dout[0], scale), ops.zeros_like(scale)

    def shapes(qkv: list[int], scale: list[int]) -> tuple[list[int], list[int]]:
        return [qkv[0], qkv[1], qkv[2] // 3], [qkv[0], num_heads, qkv[1], qkv[1]]

    return _custom("attention", "AttentionForward", shapes, outputs=2, bprop=bprop)


def pointwise_conv_kernel(bias: bool) -> ops.Custom:
    """(x [N, Cin, H, W], w [Cout, Cin, 1, 1], b [Cout]) -> the 1x1 stride-1 convolution [N, Cout, H, W], or (x, w)
    without a bias; differentiable."""
    return _weighted_kernel("pointwise_conv", "PointwiseConv", lambda x, w, *_: [x[0], w[0], *x[2:]], bias)


def token_conv_kernel(to_tokens: bool) -> ops.Custom | None:
    """A pointwise convolution with a bias between a feature map and tokens, None where the kernel cannot serve:
    to_tokens: (x [N, Cin, H, W], w [Cout, Cin, 1, 1], b) -> tokens [N, H * W, Cout] (the conv, then flatten and
    transpose); else (tokens [N, 1 + P, Cin], w, b) -> [N, Cout, P] (the class token skipped, then transpose and
    conv). Differentiable; the class token's gradient is zero."""
    if not serves("pointwise_conv"):
        return None
    if to_tokens:
        return _weighted_kernel("pointwise_conv", "PointwiseConvToTokens", lambda x, w, b: [x[0], x[2] * x[3], w[0]],
                                bias=True)
    return _weighted_kernel("pointwise_conv", "PointwiseConvFromTokens", lambda x, w, b: [x[0], w[0], x[1] - 1],
                            bias=True)


def conv3x3_kernel() -> ops.Custom:
    """(x [N, Cin, H, W], w [Cout, Cin, 3, 3]) -> the 3x3 convolution with stride 1 and padding 1 [N, Cout, H, W],
    differentiable."""
    return _weighted_kernel("conv3x3", "Conv3x3", lambda x, w: [x[0], w[0], *x[2:]], bias=False)


def conv2d_kernel(kernel_size: int, stride: int, padding: int, bias: bool) -> ops.Custom:
    """(x [N, Cin, H, W], w [Cout, Cin, k, k], b [Cout], [stride, padding]) -> the convolution [N, Cout, Ho, Wo], or
    without b; differentiable. The input and the weight gradients are separate ops, so a graph that needs no input
    gradient (the stem's images) drops that op."""
    suffix = "" if bias else "NoBias"
    backward_input = _custom("conv2d", f"Conv2dBackwardInput{suffix}", lambda x, *_: x)
    backward_weight = _custom("conv2d", f"Conv2dBackwardWeight{suffix}",
                              lambda x, w, *_: (w, w[:1]) if bias else w, outputs=2 if bias else 1)

    def bprop_with_bias(x: Tensor, w: Tensor, b: Tensor, geometry: Tensor, out: Tensor, dout: Tensor) -> tuple:
        dw, db = backward_weight(x, w, dout, geometry)
        return backward_input(x, w, dout, geometry), dw, db, ops.zeros_like(geometry)

    def bprop_without_bias(x: Tensor, w: Tensor, geometry: Tensor, out: Tensor, dout: Tensor) -> tuple:
        return (backward_input(x, w, dout, geometry), backward_weight(x, w, dout, geometry),
                ops.zeros_like(geometry))

    def shape(x: list[int], w: list[int], *_: list[int]) -> list[int]:
        return [x[0], w[0], *((size + 2 * padding - kernel_size) // stride + 1 for size in x[2:])]

    return _custom("conv2d", f"Conv2dForward{suffix}", shape,
                   bprop=bprop_with_bias if bias else bprop_without_bias)


def max_pool_kernel(kernel_size: int, stride: int, padding: int) -> ops.Custom:
    """(x [N, C, H, W], [kernel_size, stride, padding]) -> (y, argmax), differentiable with respect to x."""
    backward = _custom("max_pool", "MaxPoolBackward", lambda x, *_: x)

    def bprop(x: Tensor, geometry: Tensor, out: tuple, dout: tuple) -> tuple:
        return backward(x, out[1], dout[0]), ops.zeros_like(geometry)

    def shapes(x: list[int], geometry: list[int]) -> tuple[list[int], list[int]]:
        pooled = [x[0], x[1], *((size + 2 * padding - kernel_size) // stride + 1 for size in x[2:])]
        return pooled, pooled

    def dtypes(*_: object) -> tuple:
        return ms.float32, ms.int32

    return ops.Custom(f"{library('max_pool')}:MaxPoolForward", out_shape=shapes, out_dtype=dtypes, func_type="aot",
                      bprop=bprop)


def gelu_kernel() -> ops.Custom:
    """x -> x * Phi(x) (the exact GELU), differentiable."""
    backward = _custom("gelu", "GeluBackward", _same_shape)

    def bprop(x: Tensor, out: Tensor, dout: Tensor) -> tuple:
        return (backward(x, dout),)

    return _custom("gelu", "GeluForward", _same_shape, bprop=bprop)


def add_relu_kernel() -> ops.Custom:
    """(x, r) -> max(x + r, 0), differentiable (both gradients are the one the backward computes)."""
    backward = _custom("add_relu", "AddReluBackward", _same_shape)

    def bprop(x: Tensor, r: Tensor, out: Tensor, dout: Tensor) -> tuple:
        gradient = backward(out, dout)
        return gradient, gradient

    return _custom("add_relu", "AddReluForward", _same_shape, bprop=bprop)


def scaled_add_kernel() -> ops.Custom:
    """(x [B, ...], branch [B, ...], scale [B]) -> x + branch * scale[b] per sample, differentiable with respect to x
    and branch."""
    backward = _custom("scaled_add", "ScaledAddBackward", _same_shape)

    def bprop(x: Tensor, branch: Tensor, scale: Tensor, out: Tensor, dout: Tensor) -> tuple:
        return dout, backward(dout, scale), ops.zeros_like(scale)

    return _custom("scaled_add", "ScaledAddForward", _same_shape, bprop=bprop)


def softmax_kernel() -> ops.Custom:
    """x -> softmax over the last axis, differentiable."""
    backward = _custom("softmax", "SoftmaxBackward", _same_shape)

    def bprop(x: Tensor, out: Tensor, dout: Tensor) -> tuple:
        return (backward(out, dout),)

    return _custom("softmax", "SoftmaxForward", _same_shape, bprop=bprop)


def adamw_kernel() -> ops.Custom | None:
    """(lr, float64 [beta1, beta2, eps, weight decay], int32 step, *params, *exp_avg, *exp_avg_sq, *grads) -> [step]:
    torch's AdamW update of all the float32 params and moments, in place; None where the kernel cannot serve. A
    memory side effect to the compiler, so a graph keeps it where nothing uses its output."""
    if not serves("adamw"):
        return None
    kernel = ops.Custom(f"{library('adamw')}:AdamW", out_shape=_scalar_shape, out_dtype=_float32s, func_type="aot")
    kernel.add_prim_attr("side_effect_mem", True)
    return kernel


def _scalar_shape(*_: list[int]) -> list[int]:
    return [1]
