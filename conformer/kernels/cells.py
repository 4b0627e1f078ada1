"""Network cells on the project's compiled CPU kernels (`conformer/kernels/*.cc`, run through `ops.Custom`).

MindSpore 2.10's CPU kernels for LayerNorm, exact GELU, softmax and BatchNorm take 3x to 20x PyTorch's time at
Conformer-Ti's shapes (README "Benchmarks"). Each cell here is the MindSpore cell it subclasses (same parameters, names
and checkpoints) with a forward and backward on the project's vectorised, multi-core kernel, which computes the same
to float32 rounding. A cell falls back to MindSpore's kernel for other dtypes than float32, without a C++ compiler, and
where `use_builtin_kernels` switched it.

The factories at the end (`layer_norm`, `batch_norm`, `dense`, ...) are what the network builds with: the kernel cell
on the project's kernel path, MindSpore's own cell on MindSpore's path (`conformer.kernels.select`: what Ascend and
GPU devices run), so that a network built for MindSpore's ops is made of MindSpore's cells alone (its mixed-precision
rewrite and its exports then see nothing of ours).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from conformer.kernels import library, serves
from conformer.kernels.ops import (
    _float32s,
    _scalar_shape,
    add_relu_kernel,
    attention_kernel,
    batch_norm_inference_kernel,
    batch_norm_kernel,
    conv2d_kernel,
    conv3x3_kernel,
    dense_kernel,
    gelu_kernel,
    layer_norm_kernel,
    max_pool_kernel,
    pointwise_conv_kernel,
    scaled_add_kernel,
    softmax_kernel,
)


class CpuLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm((dim,), epsilon)` on the project's CPU kernel where it can run (see the module)."""

    def __init__(self, dim: int, epsilon: float) -> None:
        super().__init__((dim,), epsilon=epsilon)
        self.kernel = layer_norm_kernel() if serves("layer_norm") else None
        self.eps = Tensor([epsilon], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        return self.kernel(x, self.gamma, self.beta, self.eps)[0]


class CpuBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d(channels, eps, momentum)` on the project's CPU kernels where they can run (see the module):
    in training the batch statistics and the moving-statistics update, in inference the moving statistics.

    With `relu` the cell applies the ReLU that follows (inside the kernel where it serves, else after MindSpore's
    BatchNorm), whichever kernel runs."""

    def __init__(self, channels: int, eps: float, momentum: float, relu: bool = False) -> None:
        super().__init__(channels, eps=eps, momentum=momentum)
        on_cpu = serves("batch_norm")
        self.kernel = batch_norm_kernel(relu) if on_cpu else None
        self.inference_kernel = batch_norm_inference_kernel(relu) if on_cpu else None
        self.relu = relu
        # momentum: the moving value's weight (the argument's meaning; nn.BatchNorm2d stores 1 - momentum)
        self.constants = Tensor([eps, momentum], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        batch_statistics = self.training if self.use_batch_statistics is None else self.use_batch_statistics
        if self.kernel is None or x.dtype != ms.float32 or x.ndim != 4:
            y = super().construct(x)
            return ops.relu(y) if self.relu else y
        if not batch_statistics:
            return self.inference_kernel(x, self.gamma, self.beta, self.moving_mean, self.moving_variance,
                                         self.constants)
        return self.kernel(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.constants)[0]


class CpuDense(nn.Dense):
    """`nn.Dense(in_channels, out_channels, has_bias)` on the project's CPU kernel (OpenBLAS sgemm) where it can run
    (see the module)."""

    def __init__(self, in_channels: int, out_channels: int, has_bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, has_bias=has_bias)
        self.kernel = dense_kernel(has_bias) if serves("dense") else None

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        if self.has_bias:
            return self.kernel(x, self.weight, self.bias)
        return self.kernel(x, self.weight)


class CpuPointwiseConv(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, 1, has_bias=...)` (stride 1, no padding) on the project's CPU kernel
    (OpenBLAS sgemm) where it can run (see the module)."""

    def __init__(self, in_channels: int, out_channels: int, has_bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, pad_mode="valid", has_bias=has_bias)
        self.kernel = pointwise_conv_kernel(has_bias) if serves("pointwise_conv") else None

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        if self.has_bias:
            return self.kernel(x, self.weight, self.bias)
        return self.kernel(x, self.weight)


class CpuConv3x3(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=False)` (stride 1) on the
    project's CPU kernel (OpenBLAS sgemm on shifted views of the padded input) where it can run (see the module)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, pad_mode="pad", padding=1, has_bias=False)
        self.kernel = conv3x3_kernel() if serves("conv3x3") else None

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        return self.kernel(x, self.weight)


class CpuConv2d(nn.Conv2d):
    """`nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad_mode="pad", padding, has_bias)` on the project's
    CPU kernel (im2col of row blocks + OpenBLAS sgemm) where it can run (see the module)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 has_bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad" if padding else "valid",
                         padding=padding, has_bias=has_bias)
        self.kernel = conv2d_kernel(kernel_size, stride, padding, has_bias) if serves("conv2d") else None
        self.geometry = Tensor([stride, padding], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        if self.has_bias:
            return self.kernel(x, self.weight, self.bias, self.geometry)
        return self.kernel(x, self.weight, self.geometry)


class CpuMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d(kernel_size, stride, pad_mode="pad", padding)` on the project's CPU kernel where it can run (see
    the module)."""

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, pad_mode="pad", padding=padding)
        self.kernel = max_pool_kernel(kernel_size, stride, padding) if serves("max_pool") else None
        self.geometry = Tensor([kernel_size, stride, padding], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            # MindSpore resolves a bare super() from type(self): a subclass (StemMaxPool) would recurse
            return super(CpuMaxPool2d, self).construct(x)  # noqa: UP008
        return self.kernel(x, self.geometry)[0]


class CpuGELU(nn.GELU):
    """`nn.GELU(approximate=False)` on the project's CPU kernel where it can run (see the module)."""

    def __init__(self) -> None:
        super().__init__(approximate=False)
        self.kernel = gelu_kernel() if serves("gelu") else None

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        return self.kernel(x)


class CpuAddReLU(nn.Cell):
    """relu(x + r), the end of a ResNet block, as one op of the project's CPU kernel where it can run (see the module);
    otherwise MindSpore's add and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = add_relu_kernel() if serves("add_relu") else None

    def construct(self, x: Tensor, r: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32 or r.dtype != ms.float32 or x.shape != r.shape:
            return ops.relu(x + r)
        return self.kernel(x, r)


class CpuScaledAdd(nn.Cell):
    """x + branch * scale[b] per sample b (a residual through drop path), one op of the project's CPU kernel where it
    can run (see the module); otherwise MindSpore's broadcast multiply and add."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = scaled_add_kernel() if serves("scaled_add") else None

    def construct(self, x: Tensor, branch: Tensor, scale: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32 or branch.dtype != ms.float32 or x.shape != branch.shape:
            return x + branch * scale.reshape((branch.shape[0],) + (1,) * (branch.ndim - 1)).astype(branch.dtype)
        return self.kernel(x, branch, scale.astype(ms.float32))


class CpuSoftmax(nn.Softmax):
    """`nn.Softmax(axis=-1)` on the project's CPU kernel where it can run (see the module)."""

    def __init__(self) -> None:
        super().__init__(axis=-1)
        self.kernel = softmax_kernel() if serves("softmax") else None

    def construct(self, x: Tensor) -> Tensor:
        if self.kernel is None or x.dtype != ms.float32:
            return super().construct(x)
        return self.kernel(x)


class CpuAttentionCore(nn.Cell):
    """Multi-head attention from the qkv projection: [B, N, 3C] (q, k, v side by side) -> [B, N, C], heads side by
    side. On the CPU without attention dropout one fused kernel does it all (see the module); otherwise MindSpore's
    ops: reshape, transpose, batched matmuls, softmax, dropout."""

    def __init__(self, num_heads: int, scale: float, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.kernel = attention_kernel(num_heads) if attn_drop == 0 and serves("attention") else None
        self.scale_tensor = Tensor([scale], ms.float32)
        self.attn_drop = nn.Dropout(p=attn_drop)
        self.softmax = softmax()
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.av_matmul = ops.BatchMatMul()

    def construct(self, qkv: Tensor) -> Tensor:
        if self.kernel is not None and qkv.dtype == ms.float32:
            return self.kernel(qkv, self.scale_tensor)[0]
        b, n, c3 = qkv.shape
        c = c3 // 3
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.qk_matmul(q, k) * self.scale
        attn = self.attn_drop(self.softmax(attn))
        return self.av_matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, n, c)


class GlobalNorm(nn.Cell):
    """sqrt(sum of squares) over a tuple of tensors (a step's gradients), as float32: one op of the project's CPU
    kernel where it can run and every tensor is float32 (`float32` says so at construction), else a square and a sum
    per tensor."""

    def __init__(self, float32: bool = True) -> None:
        super().__init__()
        use = float32 and serves("global_norm")
        self.kernel = ops.Custom(f"{library('global_norm')}:GlobalNorm", out_shape=_scalar_shape, out_dtype=_float32s,
                                 func_type="aot") if use else None
        self.hyper_map = ops.HyperMap()

    def construct(self, tensors: tuple) -> Tensor:
        if self.kernel is None:
            return ops.sqrt(ops.addn(self.hyper_map(_sum_of_squares, tensors)))
        return self.kernel(*tensors)[0]


_sum_of_squares = ops.MultitypeFuncGraph("sum_of_squares")


@_sum_of_squares.register("Tensor")
def _sum_of_squares_tensor(tensor: Tensor) -> Tensor:
    return ops.square(tensor.astype(ms.float32)).sum()


KERNEL_CELLS = (CpuAttentionCore, CpuLayerNorm, CpuBatchNorm2d, CpuDense, CpuPointwiseConv, CpuConv3x3, CpuConv2d,
                CpuMaxPool2d, CpuGELU, CpuSoftmax, CpuAddReLU, CpuScaledAdd)


def use_builtin_kernels(network: nn.Cell) -> int:
    """Switch the network's CPU-kernel cells to MindSpore's own kernels (an export must run without our library);
    returns how many it switched. Call it before the network first runs: a graph compiled earlier keeps its kernel."""
    switched = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, KERNEL_CELLS) and cell.kernel is not None:
            cell.kernel = None
            switched += 1
            if isinstance(cell, CpuBatchNorm2d):
                cell.inference_kernel = None
    return switched


# ---------------------------------------------------------------------------------------------------- factories
# The cells a network is built from: the project's kernel cell where `conformer.kernels.serves` says its kernel runs,
# else MindSpore's own cell with the same parameters (names, shapes, checkpoints).
def layer_norm(dim: int, epsilon: float) -> nn.LayerNorm:
    return CpuLayerNorm(dim, epsilon) if serves("layer_norm") else nn.LayerNorm((dim,), epsilon=epsilon)


def batch_norm(channels: int, eps: float, momentum: float, relu: bool = False) -> nn.BatchNorm2d:
    """BatchNorm2d; with `relu` on the project's kernel the cell applies the ReLU that follows too (`fuses_relu`)."""
    if serves("batch_norm"):
        return CpuBatchNorm2d(channels, eps=eps, momentum=momentum, relu=relu)
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def fuses_relu(cell: nn.Cell) -> bool:
    """Whether `cell` (from `batch_norm`) applies the following ReLU itself: the caller then applies none. Decided
    when the network is built, so it holds under mixed precision, whose wrappers hide the cell's attributes."""
    return isinstance(cell, CpuBatchNorm2d) and cell.relu


def dense(in_channels: int, out_channels: int, has_bias: bool = True) -> nn.Dense:
    if serves("dense"):
        return CpuDense(in_channels, out_channels, has_bias=has_bias)
    return nn.Dense(in_channels, out_channels, has_bias=has_bias)


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False,
           groups: int = 1) -> nn.Conv2d:
    """nn.Conv2d; on the project's CPU kernels where one is faster than MindSpore's: 1x1 with stride 1, 3x3 with
    stride 1 and padding 1, and kernels of 4 or more (the stem's 7x7 / 2, the patch embedding). MindSpore's oneDNN
    keeps the strided 1x1 and 3x3 convolutions, where the im2col kernel measured slower."""
    if groups == 1 and kernel == 1 and stride == 1 and padding == 0 and serves("pointwise_conv"):
        return CpuPointwiseConv(in_ch, out_ch, has_bias=bias)
    if groups == 1 and kernel == 3 and stride == 1 and padding == 1 and not bias and serves("conv3x3"):
        return CpuConv3x3(in_ch, out_ch)
    if groups == 1 and kernel >= 4 and serves("conv2d"):
        return CpuConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, has_bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, pad_mode="pad" if padding else "valid", padding=padding,
                     group=groups, has_bias=bias)


def gelu() -> nn.GELU:
    return CpuGELU() if serves("gelu") else nn.GELU(approximate=False)


def softmax() -> nn.Softmax:
    return CpuSoftmax() if serves("softmax") else nn.Softmax(axis=-1)


class ZeroPadMaxPool(nn.Cell):
    """Max-pool over a zero-padded input: PyTorch's padded max-pool for non-negative inputs (after a ReLU). Pad + valid
    pool runs on every device and exports to ONNX; MindSpore's padded MaxPool2d lowers to MaxPool3DWithArgmax on
    Ascend, which first-generation 910s lack."""

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.pad = ops.Pad(((0, 0), (0, 0), (padding, padding), (padding, padding)))
        self.pool = nn.MaxPool2d(kernel_size=kernel_size, stride=stride, pad_mode="valid")

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(self.pad(x))


def max_pool_after_relu(kernel_size: int, stride: int, padding: int) -> nn.Cell:
    """PyTorch's padded max-pool of a non-negative input: the project's padded kernel (faster than pad + pool), else
    `ZeroPadMaxPool`."""
    if serves("max_pool"):
        return CpuMaxPool2d(kernel_size, stride, padding)
    return ZeroPadMaxPool(kernel_size, stride, padding)
