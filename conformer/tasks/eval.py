"""task=eval: top-1/top-5 of both heads and their sum, plus the loss, on the val split of trained weights."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hydra.utils import instantiate

from conformer.models.registry import model_name
from conformer.tasks.common import RunContext, build_data, log_datasets, open_run, task_tracker, trained_network
from conformer.train.trainer import EvalStep, evaluate_batches
from conformer.vocabulary import HEADS

log = logging.getLogger(__name__)
METRICS_FILE = "eval_metrics.json"


def format_metrics(metrics: dict[str, float]) -> str:
    """A small table: top-1 / top-5 per head, then the loss."""
    rows = [f"{'head':<6} {'top-1':>7} {'top-5':>7}"]
    rows += [f"{head:<6} {metrics[f'val/top1_{head}']:7.2f} {metrics[f'val/top5_{head}']:7.2f}" for head in HEADS]
    rows.append(f"val loss {metrics['val/loss']:.4f}")
    return "\n".join(rows)


def evaluate(ctx: RunContext) -> float:
    """Evaluate `task.checkpoint` on the val split; returns val/top1_sum."""
    cfg, group = ctx.cfg, ctx.group
    data = build_data(cfg)
    network, weights = trained_network(ctx, data.num_classes)
    evaluator = EvalStep(network, instantiate(cfg.loss, label_smoothing=0.0), data.num_classes)
    ema = bool(cfg.task.get("ema"))

    tracker = task_tracker(ctx)
    with tracker:
        open_run(tracker, ctx, weights=weights, extra_tags={"ema": ema})
        log_datasets(tracker, cfg, data, {"validation": data.val_size})
        start = time.perf_counter()
        batches = data.val_loader(group.rank, group.world_size).create_tuple_iterator(num_epochs=1)
        metrics = evaluate_batches(evaluator, batches, group)
        seconds = time.perf_counter() - start
        tracker.log_metrics({**metrics, "time/eval_s": seconds}, step=0)
        if group.is_main:
            path = _write_report(ctx.run_dir / METRICS_FILE, metrics, weights=weights, ema=ema, seconds=seconds,
                                 model=model_name(cfg.model), data=cfg.data.name, images=data.val_size,
                                 image_size=data.image_size)
            tracker.log_artifact(path)
            print(f"{model_name(cfg.model)} on {cfg.data.name} val ({data.val_size} images, {data.image_size} px), "
                  f"weights {weights}{' (EMA)' if ema else ''}:\n{format_metrics(metrics)}")
            log.info("eval: top-1 sum %.2f%% conv %.2f%% trans %.2f%% loss %.4f (%.1f s) -> %s",
                     metrics["val/top1_sum"], metrics["val/top1_conv"], metrics["val/top1_trans"],
                     metrics["val/loss"], seconds, path)
    return metrics["val/top1_sum"]


def _write_report(path: Path, metrics: dict[str, float], *, weights: Path, ema: bool, seconds: float, model: str,
                  data: str, images: int, image_size: int) -> Path:
    report = {"metrics": metrics, "weights": str(weights), "ema": ema, "model": model, "data": data,
              "split": "val", "images": images, "image_size": image_size, "time/eval_s": seconds}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
