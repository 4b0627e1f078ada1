"""Model throughput on this machine: training and eval images/s of a Conformer variant (MindSpore, graph mode).

    python benchmarks/model.py --model conformer_ti --image-size 224 --batch-size 8
    python benchmarks/model.py --model conformer_nano --image-size 64 --batch-size 32
    python benchmarks/model.py --model conformer_nano --image-size 64 --batch-size 32 --runtime affinity

The training step is the product's own (`conformer.train.step.TrainStep`: both heads, backward, AdamW). Results go to
benchmarks/results/model_<model>_<size>.json; compare them with benchmarks/results/pipeline.json (input pipeline).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

import conformer  # noqa: E402,F401  (process defaults MindSpore needs: ONEDNN_MAX_CPU_ISA, GLOG_v)
from benchmarks.common import log_to_mlflow, write_result  # noqa: E402
from conformer.models import create_model  # noqa: E402
from conformer.train.losses import DualHeadLoss  # noqa: E402
from conformer.train.optim import build_optimizer  # noqa: E402
from conformer.train.step import TrainStep  # noqa: E402

# MindSpore CPU runtime settings to compare with the default (`--runtime`; benchmarks/compare.py --b-arg=...).
RUNTIME_SETTINGS = {
    "default": lambda: None,
    "affinity": lambda: ms.runtime.set_cpu_affinity(True),
    "launch_group": lambda: ms.runtime.set_kernel_launch_group(thread_num=2, kernel_group_num=8),
    "dispatch1": lambda: ms.runtime.dispatch_threads_num(1),
    "threads1": lambda: ms.set_context(runtime_num_threads=1),
    "interop2": lambda: ms.set_context(inter_op_parallel_num=2),
}


def timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(first-call seconds incl. compile, mean seconds of the timed calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - t0) / repeats


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="conformer_ti")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runtime", choices=sorted(RUNTIME_SETTINGS), default="default",
                        help="a MindSpore CPU runtime setting to apply first")
    parser.add_argument("--mlflow-uri", default=None, help="also log the figures to this store (experiment benchmarks)")
    args = parser.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    RUNTIME_SETTINGS[args.runtime]()
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size), np.float32))
    labels = ms.Tensor(rng.integers(0, args.num_classes, args.batch_size).astype(np.int32))

    model = create_model(args.model, num_classes=args.num_classes, img_size=args.image_size)
    model.set_train(False)
    eval_first, eval_s = timed(lambda: model(images)[0].asnumpy(), warmup=2, repeats=args.repeats)

    step = TrainStep(model, DualHeadLoss(label_smoothing=0.1), build_optimizer(model, lr=1e-3))
    train_first, train_s = timed(lambda: step(images, labels), warmup=2, repeats=args.repeats)

    result = {
        "benchmark": "model", "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "eval_img_per_s": round(args.batch_size / eval_s, 2),
        "train_img_per_s": round(args.batch_size / train_s, 2),
        "eval_first_call_s": round(eval_first, 2), "train_first_call_s": round(train_first, 2),
        "runtime": args.runtime,
    }
    path = write_result(f"model_{args.model}_{args.image_size}", result)
    print(f"{args.model} @ {args.image_size}, batch {args.batch_size}: eval {result['eval_img_per_s']} img/s, "
          f"train {result['train_img_per_s']} img/s -> {path}")
    if args.mlflow_uri:
        figures = {key: value for key, value in result.items() if key.endswith(("_per_s", "_call_s"))}
        log_to_mlflow(args.mlflow_uri, f"model {args.model} {args.image_size}px", {
            "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size}, figures)
    return result


if __name__ == "__main__":
    main()
