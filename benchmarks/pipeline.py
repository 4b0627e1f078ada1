"""Throughput of the full ImageNet-recipe train pipeline (conf/data/imagenet.yaml) on realistic JPEGs.

Writes N JPEGs (~500x375, smooth random content plus noise) to a temp dir, instantiates the imagenet data
config on them (RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing,
Mixup/CutMix) with `--workers` data workers (default: the core count), iterates the train loader and reports
images/s after a warm-up, per worker too, and the host cores one accelerator card needs to feed the seed recipe
(8 cards x 128 images at 388.7 ms/step: 330 img/s per card). The machine is described in the JSON (CPU model,
cores, load average: a shared machine skews it).

    python benchmarks/pipeline.py [--workers 1] [--images 256] [--batch-size 128] [--batches 12]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mindspore as ms  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import conformer  # noqa: E402,F401  (process defaults MindSpore needs: ONEDNN_MAX_CPU_ISA, GLOG_v)
from benchmarks.common import machine  # noqa: E402
from conformer.data.generated import write_image_folder  # noqa: E402

CLASSES = 8
SEED_RECIPE_IMG_PER_S_PER_CARD = 128 / 0.3887  # ModelZoo Conformer-Ti: 128 images per card every 388.7 ms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="train JPEGs to write")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing starts")
    parser.add_argument("--batches", type=int, default=12, help="timed batches")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data workers (processes)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    return parser.parse_args()


def main() -> dict:
    args = parse_args()
    ms.set_seed(0)
    workers = args.workers
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        start = time.perf_counter()
        root = write_image_folder(Path(tmp) / "imagenet", num_classes=CLASSES,
                                  train_per_class=args.images // CLASSES, val_per_class=1, size=(500, 375),
                                  noise=12.0, seed=0)
        write_s = time.perf_counter() - start
        jpeg_kib = sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")) / 1024 / args.images
        cfg = OmegaConf.create({"seed": 0, "paths": {"data_dir": tmp, "cache_dir": tmp},
                                "loss": {"label_smoothing": 0.1},
                                "data": OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml")})
        overrides = {"num_classes": None, "num_workers": workers, "image_size": args.image_size,
                     "batch_size": args.batch_size}
        for key, value in overrides.items():
            OmegaConf.update(cfg, f"data.{key}", value)
        module = instantiate(cfg.data)
        iterator = module.train_loader().create_tuple_iterator(num_epochs=-1, output_numpy=True)

        def batches():
            while True:
                yield from iterator

        stream = batches()
        for _ in range(args.warmup):
            next(stream)
        start = time.perf_counter()
        seen = 0
        for _ in range(args.batches):
            images, targets = next(stream)
            seen += len(images)
        elapsed = time.perf_counter() - start

    result = {
        "benchmark": "pipeline",
        "images_per_s": round(seen / elapsed, 1),
        "timed_images": seen,
        "timed_s": round(elapsed, 3),
        "recipe": "conf/data/imagenet.yaml (RRC bicubic, hflip 0.5, rand-m9-mstd0.5-inc1, "
                  "erasing 0.25 pixel, mixup 0.8 / cutmix 1.0, label smoothing 0.1)",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": module.num_workers,
        "images_per_s_per_worker": round(seen / elapsed / module.num_workers, 1),
        "seed_recipe_img_per_s_per_card": round(SEED_RECIPE_IMG_PER_S_PER_CARD, 1),
        "workers_per_card_needed": math.ceil(SEED_RECIPE_IMG_PER_S_PER_CARD / (seen / elapsed / module.num_workers)),
        "train_jpegs": args.images,
        "jpeg_size": "500x375",
        "mean_jpeg_kib": round(jpeg_kib, 1),
        "write_jpegs_s": round(write_s, 2),
        "output": {"images": list(images.shape), "images_dtype": str(images.dtype),
                   "targets": list(targets.shape), "targets_dtype": str(targets.dtype)},
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pipeline: {result['images_per_s']} img/s at {args.image_size}px, batch {args.batch_size}, "
          f"{module.num_workers} workers on {result['machine']['cores']}x {result['machine']['cpu']} "
          f"-> {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return result


if __name__ == "__main__":
    main()
