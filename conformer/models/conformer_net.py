"""The vision Conformer (Peng et al., ICCV 2021) in MindSpore.

A ResNet-style CNN branch and a ViT branch run in parallel; Feature Coupling Units exchange features between them
in every block (FCUDown: feature map -> patch tokens, FCUUp: tokens -> feature map). Both branches end in their own
classifier; the prediction is the sum of the two heads' logits.

The structure, parameter shapes, norm epsilons and activation functions follow the official PyTorch code, so its
released weights load one to one (see `conformer.models.convert`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import initializer as init

from conformer.kernels import cells
from conformer.kernels.cells import (
    CpuAddReLU,
    CpuAttentionCore,
    CpuScaledAdd,
    conv2d,
    dense,
    fuses_relu,
    gelu,
    max_pool_after_relu,
)
from conformer.kernels.ops import token_conv_kernel
from conformer.models.registry import check_architecture, nearest_image_size, valid_image_size

# BatchNorm and LayerNorm inside the blocks use eps 1e-6; the stem BN and the final LayerNorm use 1e-5.
BLOCK_NORM_EPS = 1e-6
OUTER_NORM_EPS = 1e-5
# PyTorch's BN momentum 0.1 is MindSpore's 0.9 (weight of the running value).
BN_MOMENTUM = 0.9


def batch_norm(channels: int, eps: float = BLOCK_NORM_EPS, relu: bool = False) -> nn.BatchNorm2d:
    """BatchNorm2d; with `relu` the project's kernel cell applies the ReLU after it itself (see `relu_after`)."""
    return cells.batch_norm(channels, eps=eps, momentum=BN_MOMENTUM, relu=relu)


def relu_after(bn: nn.Cell) -> nn.ReLU | None:
    """The ReLU a caller applies after `bn` (from `batch_norm(..., relu=True)`), None where `bn` applies it itself."""
    return None if fuses_relu(bn) else nn.ReLU()


def layer_norm(dim: int, eps: float = BLOCK_NORM_EPS) -> nn.LayerNorm:
    return cells.layer_norm(dim, epsilon=eps)


class DropPath(nn.Cell):
    """Stochastic depth per sample: zero a sample's residual branch with probability `drop_prob`.

    `mask` ([batch], 0 or 1 / keep_prob per sample) comes from the host when given (`drop_path_masks`: drawn from
    a seed and the step, so a resumed run draws the same masks); without it the dropout kernel draws one, from a
    random state that no checkpoint can hold.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.dropout = nn.Dropout(p=self.drop_prob)
        self.scaled_add = CpuScaledAdd()

    def construct(self, x: Tensor, mask: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """The branch `x` through drop path, added to `residual` where given (one op on the CPU kernel)."""
        if not self.training or self.drop_prob == 0.0:
            return x if residual is None else residual + x
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if mask is None:
            # Dropout on a ones tensor yields the per-sample keep mask already scaled by 1 / keep_prob.
            mask = self.dropout(x.new_ones(mask_shape))
        if residual is None:
            return x * mask.reshape(mask_shape).astype(x.dtype)
        return self.scaled_add(residual, x, mask.reshape(x.shape[0]))


def drop_path_masks(rates: Sequence[float], batch: int, key: Sequence[int]) -> np.ndarray:
    """Per-sample drop-path masks [len(rates), batch] for one forward pass, drawn from `key` (e.g. seed, rank,
    step) alone: 0 for a dropped sample, 1 / keep_prob for a kept one (timm's scaling)."""
    keep = 1.0 - np.asarray(rates, np.float64)[:, None]
    draws = np.random.default_rng([int(k) for k in key]).random((len(rates), batch))
    return np.where(draws < keep, 1.0 / keep, 0.0).astype(np.float32)


STEM_POOL = {"kernel_size": 3, "stride": 2, "padding": 1}  # the stem's max-pool, PyTorch's symmetric padding 1


class Mlp(nn.Cell):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = dense(dim, hidden_dim)
        self.act = gelu()
        self.fc2 = dense(hidden_dim, dim)
        self.drop = nn.Dropout(p=drop)

    def construct(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Attention(nn.Cell):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = dense(dim, dim * 3, has_bias=qkv_bias)
        self.core = CpuAttentionCore(num_heads, self.scale, attn_drop)
        self.proj = dense(dim, dim)
        self.proj_drop = nn.Dropout(p=proj_drop)

    def construct(self, x: Tensor) -> Tensor:
        return self.proj_drop(self.proj(self.core(self.qkv(x))))


class Block(nn.Cell):
    """Transformer encoder block: pre-norm attention and MLP, each with a drop-path residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def construct(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """`masks`: [2, batch] drop-path masks for the attention and the MLP branch (None: drawn in the graph)."""
        if masks is None:
            x = self.drop_path(self.attn(self.norm1(x)), None, x)
            return self.drop_path(self.mlp(self.norm2(x)), None, x)
        x = self.drop_path(self.attn(self.norm1(x)), masks[0], x)
        return self.drop_path(self.mlp(self.norm2(x)), masks[1], x)


class ConvBlock(nn.Cell):
    """ResNet bottleneck; its 3x3 conv optionally takes the FCUUp features added to its input."""

    expansion = 4

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False,
                 groups: int = 1) -> None:
        super().__init__()
        med_planes = outplanes // self.expansion
        self.conv1 = conv2d(inplanes, med_planes, 1)
        self.bn1 = batch_norm(med_planes, relu=True)
        self.conv2 = conv2d(med_planes, med_planes, 3, stride=stride, padding=1, groups=groups)
        self.bn2 = batch_norm(med_planes, relu=True)
        self.conv3 = conv2d(med_planes, outplanes, 1)
        self.bn3 = batch_norm(outplanes)
        self.relu1, self.relu2 = relu_after(self.bn1), relu_after(self.bn2)
        self.add_relu = CpuAddReLU()
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = conv2d(inplanes, outplanes, 1, stride=stride)
            self.residual_bn = batch_norm(outplanes)

    def construct(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the block output and the activation after the 3x3 conv (the FCUDown input)."""
        residual = x
        x = self.bn1(self.conv1(x))
        if self.relu1 is not None:
            x = self.relu1(x)
        if x_t is not None:
            x = x + x_t
        x2 = self.bn2(self.conv2(x))
        if self.relu2 is not None:
            x2 = self.relu2(x2)
        x = self.bn3(self.conv3(x2))
        if self.res_conv:
            residual = self.residual_bn(self.residual_conv(residual))
        return self.add_relu(x, residual), x2


class FCUDown(nn.Cell):
    """CNN feature map -> transformer tokens: 1x1 conv, average pool to the patch grid, LayerNorm, GELU.

    The pool runs first: both are linear, so pooling before the conv gives the official order's result (to float32
    rounding) with dw_stride^2 times fewer multiplications, and pools the narrower map."""

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = conv2d(inplanes, outplanes, 1, bias=True)
        self.to_tokens = token_conv_kernel(to_tokens=True)
        self.dw_stride = dw_stride
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = layer_norm(outplanes)
        self.act = gelu()
        self.concat = ops.Concat(axis=1)

    def construct(self, x: Tensor, x_t: Tensor) -> Tensor:
        if self.dw_stride > 1:
            x = self.sample_pooling(x)
        if self.to_tokens is not None and x.dtype == ms.float32:
            x = self.to_tokens(x, self.conv_project.weight, self.conv_project.bias)  # the conv and transpose at once
        else:
            x = self.conv_project(x)
            b, c = x.shape[0], x.shape[1]
            x = x.reshape(b, c, -1).transpose(0, 2, 1)
        x = self.act(self.ln(x))
        return self.concat((x_t[:, :1], x))


class FCUUp(nn.Cell):
    """Transformer tokens -> CNN feature map: 1x1 conv, BN, ReLU, nearest-neighbour upsampling."""

    def __init__(self, inplanes: int, outplanes: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = conv2d(inplanes, outplanes, 1, bias=True)
        self.from_tokens = token_conv_kernel(to_tokens=False)
        self.bn = batch_norm(outplanes, relu=True)
        self.act = relu_after(self.bn)

    def construct(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        if self.from_tokens is not None and x.dtype == ms.float32:
            x_r = self.from_tokens(x, self.conv_project.weight, self.conv_project.bias).reshape(b, -1, h, w)
        else:
            x_r = self.conv_project(x[:, 1:].transpose(0, 2, 1).reshape(b, c, h, w))
        x_r = self.bn(x_r)
        if self.act is not None:
            x_r = self.act(x_r)
        if self.up_stride == 1:
            return x_r
        s = self.up_stride
        ch = x_r.shape[1]
        # Nearest-neighbour upsampling by an integer factor: repeat every pixel s x s times.
        x_r = x_r.reshape(b, ch, h, 1, w, 1).broadcast_to((b, ch, h, s, w, s))
        return x_r.reshape(b, ch, h * s, w * s)


class ConvTransBlock(nn.Cell):
    """One Conformer stage block: CNN bottleneck, FCUDown, transformer block, FCUUp, fusion bottleneck."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float, last_fusion: bool = False, num_med_block: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv, groups=groups)
        if last_fusion:
            self.fusion_block = ConvBlock(outplanes, outplanes, stride=2, res_conv=True, groups=groups)
        else:
            self.fusion_block = ConvBlock(outplanes, outplanes, groups=groups)
        self.num_med_block = num_med_block
        if num_med_block > 0:
            self.med_block = nn.CellList(
                [ConvBlock(outplanes, outplanes, groups=groups) for _ in range(num_med_block)])
        med = outplanes // ConvBlock.expansion
        self.squeeze_block = FCUDown(med, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, med, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                                 drop_path_rate)
        self.dw_stride = dw_stride

    def construct(self, x: Tensor, x_t: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, x2 = self.cnn_block(x)
        h, w = x2.shape[2], x2.shape[3]
        x_st = self.squeeze_block(x2, x_t)
        # The class token enters twice (x_st carries it and so does x_t): this is what the official weights expect.
        x_t = self.trans_block(x_st + x_t, masks)
        if self.num_med_block > 0:
            for med_block in self.med_block:
                x, _ = med_block(x)
        x_t_r = self.expand_block(x_t, h // self.dw_stride, w // self.dw_stride)
        x, _ = self.fusion_block(x, x_t_r)
        return x, x_t


class Conformer(nn.Cell):
    """Conformer: returns `(conv_logits, trans_logits)`; the prediction is their sum.

    Args mirror the official constructor; `img_size` is only used to validate the input geometry early.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000, base_channel: int = 64,
                 channel_ratio: float = 4, num_med_block: int = 0, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 img_size: int | None = 224) -> None:
        super().__init__()
        check_architecture(patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, drop_path_rate=drop_path_rate, img_size=img_size)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.in_chans = in_chans
        dpr = np.linspace(0, drop_path_rate, depth).tolist()
        # The drop probability of each drop-path mask a forward pass uses: attention and MLP of every block.
        self.drop_path_rates = tuple(rate for rate in dpr for _ in range(2)) if drop_path_rate > 0 else ()

        self.cls_token = Parameter(init.initializer(init.TruncatedNormal(0.02), (1, 1, embed_dim)), name="cls_token")

        # Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool with symmetric padding 1 (PyTorch style).
        self.conv1 = conv2d(in_chans, 64, 7, stride=2, padding=3)
        self.bn1 = batch_norm(64, eps=OUTER_NORM_EPS, relu=True)
        self.act1 = relu_after(self.bn1)
        self.maxpool = max_pool_after_relu(**STEM_POOL)
        self.concat = ops.Concat(axis=1)

        stage_1_channel = int(base_channel * channel_ratio)
        trans_dw_stride = patch_size // 4
        self.conv_1 = ConvBlock(64, stage_1_channel, res_conv=True, stride=1)
        self.trans_patch_conv = conv2d(64, embed_dim, trans_dw_stride, stride=trans_dw_stride, bias=True)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[0])

        blocks = []
        stage_len = depth // 3
        stage_2_channel = stage_1_channel * 2
        stage_3_channel = stage_2_channel * 2
        # Block index i runs 2..depth as in the official code (block 1 is conv_1 + trans_1).
        for i in range(2, depth + 1):
            if i <= stage_len:
                in_ch, out_ch, stride, dw, res = stage_1_channel, stage_1_channel, 1, trans_dw_stride, False
            elif i <= 2 * stage_len:
                first = i == stage_len + 1
                in_ch = stage_1_channel if first else stage_2_channel
                out_ch, stride, dw, res = stage_2_channel, 2 if first else 1, trans_dw_stride // 2, first
            else:
                first = i == 2 * stage_len + 1
                in_ch = stage_2_channel if first else stage_3_channel
                out_ch, stride, dw, res = stage_3_channel, 2 if first else 1, trans_dw_stride // 4, first
            blocks.append(ConvTransBlock(
                in_ch, out_ch, res, stride, dw, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                attn_drop_rate, dpr[i - 1], last_fusion=i == depth, num_med_block=num_med_block))
        self.conv_trans = nn.CellList(blocks)

        self.trans_norm = layer_norm(embed_dim, eps=OUTER_NORM_EPS)
        self.trans_cls_head = nn.Dense(embed_dim, num_classes)
        self.conv_cls_head = nn.Dense(stage_3_channel, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: trunc-normal(0.02) linears, kaiming fan_out convs, unit norms, PyTorch-default conv biases."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Dense):
                cell.weight.set_data(init.initializer(init.TruncatedNormal(0.02), cell.weight.shape))
                if cell.bias is not None:
                    cell.bias.set_data(init.initializer("zeros", cell.bias.shape))
            elif isinstance(cell, nn.Conv2d):
                cell.weight.set_data(init.initializer(
                    init.HeNormal(mode="fan_out", nonlinearity="relu"), cell.weight.shape))
                if cell.bias is not None:
                    fan_in = int(np.prod(cell.weight.shape[1:]))
                    bound = 1.0 / math.sqrt(fan_in)
                    cell.bias.set_data(init.initializer(init.Uniform(bound), cell.bias.shape))
            elif isinstance(cell, (nn.LayerNorm, nn.BatchNorm2d)):
                cell.gamma.set_data(init.initializer("ones", cell.gamma.shape))
                cell.beta.set_data(init.initializer("zeros", cell.beta.shape))

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse a batch shape the network cannot take, before any graph is compiled."""
        if len(shape) != 4 or shape[1] != self.in_chans:
            raise ValueError(f"expected images shaped [batch, {self.in_chans}, H, W], got {list(shape)}")
        if shape[2] != shape[3]:
            raise ValueError(f"expected square images, got {shape[2]}x{shape[3]}")
        if not valid_image_size(shape[2], self.patch_size):
            raise ValueError(f"image size {shape[2]} is not a positive multiple of the patch size {self.patch_size}: "
                             f"use e.g. {nearest_image_size(shape[2], self.patch_size)}")

    def forward_features(self, x: Tensor, drop_path_masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return the final CNN feature map and the normalised token sequence."""
        b = x.shape[0]
        x_base = self.bn1(self.conv1(x))
        if self.act1 is not None:
            x_base = self.act1(x_base)
        x_base = self.maxpool(x_base)
        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base)
        x_t = x_t.reshape(b, self.embed_dim, -1).transpose(0, 2, 1)
        # a Tensor method called on a Parameter attribute (self.cls_token.broadcast_to) makes MindSpore's compiled
        # graph hold this cell forever: every model called in a process would stay in memory
        cls_tokens = ops.broadcast_to(self.cls_token, (b, 1, self.embed_dim)).astype(x_t.dtype)
        if drop_path_masks is None:
            x_t = self.trans_1(self.concat((cls_tokens, x_t)))
            for block in self.conv_trans:
                x, x_t = block(x, x_t)
        else:  # two rows per transformer block, in order (`drop_path_rates`)
            x_t = self.trans_1(self.concat((cls_tokens, x_t)), drop_path_masks[0:2])
            row = 2
            for block in self.conv_trans:
                x, x_t = block(x, x_t, drop_path_masks[row:row + 2])
                row += 2
        return x, self.trans_norm(x_t)

    def construct(self, x: Tensor, drop_path_masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`drop_path_masks` ([len(drop_path_rates), batch], see `drop_path_masks`) only matter in training."""
        x, x_t = self.forward_features(x, drop_path_masks)
        conv_logits = self.conv_cls_head(x.mean(axis=(2, 3)))
        trans_logits = self.trans_cls_head(x_t[:, 0])
        return conv_logits, trans_logits
