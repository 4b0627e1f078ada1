"""The largest power-of-two loss scale whose first mixed-precision training step does not overflow.

    python benchmarks/loss_scale.py --model conformer_ti --image-size 224 --batch-size 8 --amp-level O1
    python benchmarks/loss_scale.py --model conformer_nano --image-size 32 --batch-size 64 --amp-level O1

The network is built on MindSpore's ops (`hardware.kernels=mindspore`: the path Ascend runs, float16 under AMP) with
label smoothing 0.1 and clipping at 5, as in the seed recipe, on a fixed random batch. The step starts at 2^24
(MindSpore's DynamicLossScaleManager default) with dynamic scaling, which halves the scale on every overflow: the first
applied step's scale is the largest that fits. `trainer.init_loss_scale` is chosen below it, so that the recipe's
first steps apply updates. Results go to benchmarks/results/loss_scale_<model>_<size>_<level>.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

import conformer  # noqa: E402,F401  (process defaults MindSpore needs)
from benchmarks.common import write_result  # noqa: E402
from conformer import kernels  # noqa: E402
from conformer.models import create_model  # noqa: E402
from conformer.train.losses import DualHeadLoss  # noqa: E402
from conformer.train.optim import build_optimizer  # noqa: E402
from conformer.train.step import DEFAULT_INIT_LOSS_SCALE, TrainStep, apply_amp  # noqa: E402

START = 2.0**24


def first_fitting_scale(model: str, image_size: int, batch_size: int, amp_level: str, workdir: Path) -> dict:
    """Train from START until the first applied step; the scales tried and the one that fit."""
    ms.set_device("CPU")
    kernels.select("mindspore", amp_level)
    ms.set_seed(0)
    classes = 10 if model == "conformer_nano" else 1000
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((batch_size, 3, image_size, image_size)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, classes, batch_size).astype(np.int32))
    network = apply_amp(create_model(model, num_classes=classes, img_size=image_size), amp_level, workdir=workdir)
    step = TrainStep(network, DualHeadLoss(label_smoothing=0.1), build_optimizer(network, lr=1e-3),
                     loss_scale="dynamic", init_loss_scale=START, clip_grad_norm=5.0)
    tried, scale = [], START
    for _ in range(int(math.log2(START)) + 1):
        result = step(images, labels)
        tried.append({"scale": scale, "overflow": result.overflow, "grad_norm": result.grad_norm})
        if result.applied:
            return {"first_fitting_scale": scale, "log2": int(math.log2(scale)), "tried": tried,
                    "default_init_loss_scale": DEFAULT_INIT_LOSS_SCALE,
                    "default_fits": DEFAULT_INIT_LOSS_SCALE <= scale}
        scale = result.loss_scale
    raise RuntimeError(f"no step applied between 2^24 and 1 ({tried[-1]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conformer_ti")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--amp-level", default="O1", choices=("O1", "O2", "O3"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:  # O1's rewritten source, read when the step compiles
        result = first_fitting_scale(args.model, args.image_size, args.batch_size, args.amp_level, Path(workdir))
    result.update(model=args.model, image_size=args.image_size, batch_size=args.batch_size, amp_level=args.amp_level)
    path = write_result(f"loss_scale_{args.model}_{args.image_size}_{args.amp_level}", result)
    print(f"{args.model} {args.image_size} px, batch {args.batch_size}, AMP {args.amp_level}: the first step fits at "
          f"2^{result['log2']}; the default initial scale {DEFAULT_INIT_LOSS_SCALE:g} "
          f"{'fits' if result['default_fits'] else 'overflows'} -> {path}")


if __name__ == "__main__":
    main()
