"""Single ops at Conformer-Ti shapes (224 px, batch 8), forward + backward: MindSpore on the CPU against PyTorch.

    python benchmarks/ops.py                                  # MindSpore only
    python benchmarks/ops.py --torch-python /path/to/python   # and PyTorch (a Python with torch), interleaved

Names the kernels where MindSpore itself is slower than PyTorch at the model's own shapes. Each framework runs in its
own process (PyTorch's spinning OpenMP threads would slow MindSpore down in a shared one), A B A B over `--rounds`;
the figure is the median time of one forward + backward (the gradient of the output's sum with respect to the
input). Results: benchmarks/results/ops.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (input shape, what it is in Conformer-Ti)
OPS = {
    "gelu": ((8, 197, 1536), "exact GELU of an MLP hidden layer (12 of 23 per forward), MindSpore's kernel"),
    "gelu_ours": ((8, 197, 1536), "the same on the project's C++ kernel (conformer.kernels.cells)"),
    "layer_norm": ((8, 197, 384), "LayerNorm of the tokens (38 per forward), MindSpore's kernel"),
    "layer_norm_ours": ((8, 197, 384), "the same on the project's C++ kernel"),
    "dense": ((8, 197, 384), "the MLP's first Linear 384 -> 1536, MindSpore's kernel"),
    "dense_ours": ((8, 197, 384), "the same on the project's C++ kernel (OpenBLAS sgemm)"),
    "softmax": ((8, 6, 197, 197), "attention softmax (12 per forward), MindSpore's kernel"),
    "softmax_ours": ((8, 6, 197, 197), "the same on the project's C++ kernel"),
    "attention_ours": ((8, 197, 1152), "attention from the qkv projection, 6 heads (12 per forward), our kernel"),
    "batch_norm": ((8, 64, 56, 56), "BatchNorm (training) of a stage-1 conv, MindSpore's kernel"),
    "batch_norm_ours": ((8, 64, 56, 56), "the same on the project's C++ kernel"),
    "conv3x3": ((8, 64, 56, 56), "a 3x3 convolution 64 -> 64 (Conformer-S's stage 1), MindSpore's kernel"),
    "conv3x3_ours": ((8, 64, 56, 56), "the same on the project's C++ kernel (sgemm on shifted views)"),
    "conv3x3_ti": ((8, 16, 56, 56), "Conformer-Ti's stage-1 3x3 convolution 16 -> 16, MindSpore's kernel"),
    "conv3x3_ti_ours": ((8, 16, 56, 56), "the same on the project's C++ kernel"),
    "stem_conv": ((8, 3, 224, 224), "the stem's 7x7 / 2 convolution 3 -> 64, padding 3, MindSpore's kernel"),
    "stem_conv_ours": ((8, 3, 224, 224), "the same on the project's C++ kernel (im2col + sgemm)"),
    "patch_conv": ((8, 64, 56, 56), "the patch embedding 4x4 / 4, 64 -> 384 with a bias, MindSpore's kernel"),
    "patch_conv_ours": ((8, 64, 56, 56), "the same on the project's C++ kernel (im2col + sgemm)"),
    "conv1x1": ((8, 64, 56, 56), "a stage-1 1x1 convolution 64 -> 256, MindSpore's kernel"),
    "conv1x1_ours": ((8, 64, 56, 56), "the same on the project's C++ kernel (OpenBLAS sgemm)"),
    "stem_max_pool": ((8, 64, 112, 112), "the stem's 3x3/2 max-pool, padding 1, MindSpore's kernel"),
    "stem_max_pool_ours": ((8, 64, 112, 112), "the same on the project's C++ kernel"),
}


def mindspore_ops() -> dict:
    import mindspore as ms
    from mindspore import nn

    import conformer  # noqa: F401  (ONEDNN_MAX_CPU_ISA and the other process defaults)
    from conformer.kernels.cells import (
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
    )

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    return {"gelu": nn.GELU(approximate=False), "gelu_ours": CpuGELU(),
            "layer_norm": nn.LayerNorm((384,), epsilon=1e-6), "layer_norm_ours": CpuLayerNorm(384, epsilon=1e-6),
            "dense": nn.Dense(384, 1536), "dense_ours": CpuDense(384, 1536),
            "softmax": nn.Softmax(axis=-1), "softmax_ours": CpuSoftmax(),
            "attention_ours": CpuAttentionCore(6, 64 ** -0.5),
            "batch_norm": nn.BatchNorm2d(64, eps=1e-6, momentum=0.9),
            "batch_norm_ours": CpuBatchNorm2d(64, eps=1e-6, momentum=0.9),
            "conv3x3": nn.Conv2d(64, 64, 3, pad_mode="pad", padding=1, has_bias=False),
            "conv3x3_ours": CpuConv3x3(64, 64),
            "conv3x3_ti": nn.Conv2d(16, 16, 3, pad_mode="pad", padding=1, has_bias=False),
            "conv3x3_ti_ours": CpuConv3x3(16, 16),
            "stem_conv": nn.Conv2d(3, 64, 7, stride=2, pad_mode="pad", padding=3, has_bias=False),
            "stem_conv_ours": CpuConv2d(3, 64, 7, stride=2, padding=3),
            "patch_conv": nn.Conv2d(64, 384, 4, stride=4, has_bias=True),
            "patch_conv_ours": CpuConv2d(64, 384, 4, stride=4, has_bias=True),
            "conv1x1": nn.Conv2d(64, 256, 1, has_bias=False), "conv1x1_ours": CpuPointwiseConv(64, 256),
            "stem_max_pool": nn.MaxPool2d(3, 2, pad_mode="pad", padding=1),
            "stem_max_pool_ours": CpuMaxPool2d(3, 2, 1)}


def time_mindspore(repeats: int) -> dict[str, float]:
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    class SumOf(nn.Cell):
        def __init__(self, op: nn.Cell) -> None:
            super().__init__()
            self.op = op

        def construct(self, x: ms.Tensor) -> ms.Tensor:
            return self.op(x).sum()

    seconds = {}
    for name, op in mindspore_ops().items():
        op.set_train(True)
        step = ms.jit(ms.value_and_grad(SumOf(op)))
        x = ms.Tensor(np.random.default_rng(0).standard_normal(OPS[name][0]).astype(np.float32))
        seconds[name] = _median_seconds(lambda step=step, x=x: step(x)[1].asnumpy(), repeats)
    return seconds


def time_torch(repeats: int) -> dict[str, float]:
    import torch
    from torch import nn

    modules = {"gelu": nn.GELU(), "layer_norm": nn.LayerNorm(384, eps=1e-6), "dense": nn.Linear(384, 1536),
               "softmax": nn.Softmax(dim=-1), "batch_norm": nn.BatchNorm2d(64, eps=1e-6),
               "conv3x3": nn.Conv2d(64, 64, 3, padding=1, bias=False), "conv1x1": nn.Conv2d(64, 256, 1, bias=False),
               "conv3x3_ti": nn.Conv2d(16, 16, 3, padding=1, bias=False),
               "stem_conv": nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
               "patch_conv": nn.Conv2d(64, 384, 4, stride=4),
               "stem_max_pool": nn.MaxPool2d(3, stride=2, padding=1), "attention": _torch_attention(6)}
    seconds = {}
    for name in OPS:
        module = modules[name.removesuffix("_ours")]  # PyTorch's own kernel stands against both of ours
        x = torch.randn(*OPS[name][0], requires_grad=True)

        def step(module: nn.Module = module, x: torch.Tensor = x) -> None:
            x.grad = None
            module(x).sum().backward()

        seconds[name] = _median_seconds(step, repeats)
    return seconds


def _torch_attention(heads: int):
    """Conformer's attention from the qkv projection, in PyTorch (the official code's ops)."""
    from torch import nn

    class Attention(nn.Module):
        def forward(self, qkv):
            b, n, c3 = qkv.shape
            q, k, v = qkv.reshape(b, n, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (c3 // 3 // heads) ** -0.5).softmax(dim=-1)
            return (attn @ v).transpose(1, 2).reshape(b, n, c3 // 3)

    return Attention()


def _median_seconds(fn, repeats: int) -> float:
    for _ in range(3):  # compile, warm up
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("mindspore", "torch"), default=None,
                        help="time one framework in this process and print JSON (what the driver runs)")
    parser.add_argument("--torch-python", default=None, help="a Python with torch: also time PyTorch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.framework:
        timer = time_mindspore if args.framework == "mindspore" else time_torch
        print(json.dumps(timer(args.repeats)))
        return None

    from benchmarks.common import write_result

    sides = {"mindspore": sys.executable, **({"torch": args.torch_python} if args.torch_python else {})}
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, python in sides.items():
            done = subprocess.run([python, __file__, "--framework", side, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=True)
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {}
    for name, (shape, what) in OPS.items():
        row = {"shape": list(shape), "what": what}
        for side in sides:
            row[f"{side}_ms"] = round(1e3 * statistics.median(run[name] for run in runs[side]), 3)
        if "torch" in sides:
            row["mindspore_over_torch"] = round(row["mindspore_ms"] / row["torch_ms"], 2)
        table[name] = row
        print(f"{name:>14} {str(shape):>20}: " + "  ".join(f"{side} {row[f'{side}_ms']:8.2f} ms" for side in sides)
              + (f"  x{row['mindspore_over_torch']}" if "torch" in sides else ""))
    torch_version = None
    if args.torch_python:
        torch_version = subprocess.run([args.torch_python, "-c", "import torch; print(torch.__version__)"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    result = {"benchmark": "ops", "rounds": args.rounds, "repeats": args.repeats, "torch": torch_version,
              "ops": table, "runs": runs}
    print(f"-> {write_result('ops', result)}")
    return result


if __name__ == "__main__":
    main()
