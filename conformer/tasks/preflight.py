"""task=preflight: prove a machine before the real job. Run as the job would (every worker under msrun), each rank
checks the model against the official reference vectors, the collectives, and times the training step and the input
pipeline; rank 0 prints one table against the seed recipe's figures and records it in MLflow."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from mindspore import Tensor

from conformer import kernels
from conformer.errors import PreflightFailed
from conformer.models import create_model
from conformer.models.convert import load_official_weights
from conformer.models.registry import model_name
from conformer.runtime.hardware import ProcessGroup, all_gather_floats, all_reduce_sum, device_checks
from conformer.tasks.common import RunContext, build_data, build_network, open_run, task_tracker
from conformer.train.step import FiniteOnEveryRank, TrainStep, apply_amp

log = logging.getLogger(__name__)
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"  # the official model's vectors (its README)
REPORT_FILE = "preflight.json"
# The seed recipe (ModelZoo README): Conformer-Ti, 128 images per card, 8 x Ascend 910.
SEED_STEP_MS = 388.7
SEED_IMAGES_PER_S = 128 / (SEED_STEP_MS / 1000)  # per card
# Largest error against the official float32 logits, relative to their largest magnitude. float32: MindSpore's and
# our kernels measured 3e-6 or less on the CPU; a device's other summation orders get 30x that. float16 (AMP): O1-O3
# measured up to 2e-3 on the CPU; 10x that.
PARITY_TOLERANCE = {"O0": 1e-4, "O1": 2e-2, "O2": 2e-2, "O3": 2e-2}


@dataclass(frozen=True)
class RankResult:
    """One rank's measurements."""

    parity_error: float
    all_reduce_ok: bool
    overflow_agreement_ok: bool
    step_ms: float
    pipeline_images_per_s: float

    def row(self) -> list[float]:
        return [self.parity_error, float(self.all_reduce_ok), float(self.overflow_agreement_ok), self.step_ms,
                self.pipeline_images_per_s]


def reference_parity(amp_level: str, workdir: Path) -> float:
    """The reference model (official weights) on the reference input, against the official logits: the largest
    error relative to their largest magnitude, on this process's kernel path and AMP level."""
    io = np.load(REFERENCE_DIR / "tiny_io.npz")
    model = create_model("conformer_nano", num_classes=10, img_size=64)
    load_official_weights(model, REFERENCE_DIR / "tiny_state.npz")
    model = apply_amp(model, amp_level, workdir=workdir)
    model.set_train(False)
    conv, trans = model(Tensor(io["x"]))
    got = conv.astype(ms.float32).asnumpy() + trans.astype(ms.float32).asnumpy()
    return float(np.abs(got - io["sum_logits"]).max() / np.abs(io["sum_logits"]).max())


def all_reduce_ok(group: ProcessGroup) -> bool:
    """Every rank's (rank + 1) summed over ranks: world (world + 1) / 2 on every rank."""
    total = all_reduce_sum(np.array([group.rank + 1.0]), group)[0]
    return bool(total == group.world_size * (group.world_size + 1) / 2)


def overflow_agreement_ok(group: ProcessGroup) -> bool:
    """The step's overflow decision across ranks: all finite stays finite; one rank's overflow (the last's) is every
    rank's."""
    if not group.distributed:
        return True
    agree = FiniteOnEveryRank()
    everywhere = bool(agree(Tensor(True)).asnumpy())
    one_overflows = bool(agree(Tensor(group.rank != group.world_size - 1)).asnumpy())
    return everywhere and not one_overflows


def time_pipeline(data, group: ProcessGroup, batches: int) -> tuple[float, tuple[Tensor, Tensor]]:
    """This rank's training pipeline (decode, augment, batch) in images per second over `batches` batches after the
    first, and its first batch."""
    iterator = data.train_loader(group.rank, group.world_size).create_tuple_iterator(num_epochs=1)
    first = next(iterator)
    start, images = time.perf_counter(), 0
    for _, (batch, _) in zip(range(batches), iterator):
        images += batch.shape[0]
    return images / max(time.perf_counter() - start, 1e-9), first


def time_train_step(ctx: RunContext, data, batch: tuple[Tensor, Tensor], steps: int) -> float:
    """Milliseconds per training step of the configured model, optimizer, loss scale and AMP level on `batch` (this
    rank's per-card batch), after one step that compiles; gradients all-reduced as in the job."""
    cfg = ctx.cfg
    network = apply_amp(build_network(cfg, data.num_classes), cfg.hardware.amp_level, workdir=ctx.run_dir)
    optimizer = instantiate(cfg.optim.optimizer)(network, lr=float(cfg.optim.schedule.base_lr))
    trainer = cfg.trainer
    step = TrainStep(network, instantiate(cfg.loss), optimizer, clip_grad_norm=trainer.clip_grad_norm,
                     loss_scale=trainer.loss_scale, init_loss_scale=trainer.init_loss_scale,
                     scale_factor=trainer.scale_factor, scale_window=trainer.scale_window,
                     mask_seed=(cfg.seed, ctx.group.rank))
    images, targets = batch
    step(images, targets)  # compiles
    start = time.perf_counter()
    for _ in range(steps):
        result = step(images, targets)
    if not np.isfinite(result.loss):
        raise PreflightFailed(f"the training step gave a non-finite loss ({result.loss}) on rank {ctx.group.rank}")
    return (time.perf_counter() - start) * 1000 / steps


def preflight(ctx: RunContext) -> float:
    """Run every check on this rank, gather them, and (rank 0) report; returns the step's images/s per card."""
    cfg, group = ctx.cfg, ctx.group
    amp = cfg.hardware.amp_level
    data = build_data(cfg)
    pipeline, batch = time_pipeline(data, group, int(cfg.task.pipeline_batches))
    mine = RankResult(parity_error=reference_parity(amp, ctx.run_dir), all_reduce_ok=all_reduce_ok(group),
                      overflow_agreement_ok=overflow_agreement_ok(group),
                      step_ms=time_train_step(ctx, data, batch, int(cfg.task.steps)),
                      pipeline_images_per_s=pipeline)
    ranks = [RankResult(float(row[0]), bool(row[1]), bool(row[2]), float(row[3]), float(row[4]))
             for row in all_gather_floats(mine.row(), group)]
    batch_size = int(batch[0].shape[0])
    devices = device_checks(cfg.hardware) if group.is_main else []  # the machine's, asked once (rank 0 reports)
    report = preflight_report(cfg, ranks, batch_size, devices)
    if group.is_main:
        _record(ctx, report)
    failed = [name for name, _, ok in report["checks"] if not ok]
    if failed:
        raise PreflightFailed(f"preflight failed: {', '.join(failed)} (see the table above)")
    return report["images_per_s_per_card"]


def preflight_report(cfg, ranks: list[RankResult], batch_size: int,
                     devices: list[tuple[str, str, bool]]) -> dict:
    """The checks (`devices`, `conformer.runtime.hardware.device_checks`, then the ranks') as (name, finding,
    passed) rows and the timings against the seed recipe."""
    hardware, amp = cfg.hardware, cfg.hardware.amp_level
    tolerance = PARITY_TOLERANCE[amp]
    worst = max(rank.parity_error for rank in ranks)
    step_ms = float(np.median([rank.step_ms for rank in ranks]))
    images_per_s = batch_size / (step_ms / 1000)
    checks = [*devices,
              ("workers", f"{len(ranks)} of {hardware.workers * hardware.nodes} answered", True),
              ("reference logits", f"max rel. error {worst:.2e} (tolerance {tolerance:.0e} at AMP {amp})",
               bool(worst <= tolerance)),
              ("all-reduce", "sum over ranks correct on every rank" if all(r.all_reduce_ok for r in ranks)
               else "wrong sum on ranks " + str([i for i, r in enumerate(ranks) if not r.all_reduce_ok]),
               all(r.all_reduce_ok for r in ranks)),
              ("overflow decision", "shared by every rank" if all(r.overflow_agreement_ok for r in ranks)
               else "ranks disagree", all(r.overflow_agreement_ok for r in ranks))]
    return {"hardware": hardware.name, "device_target": hardware.device_target, "model": model_name(cfg.model),
            "image_size": int(cfg.data.image_size), "batch_per_card": batch_size, "amp_level": amp,
            "kernels": f"{hardware.get('kernels', 'auto')} ({kernels.selected()})", "checks": checks,
            "ranks": [vars(r) for r in ranks],
            "step_ms": step_ms, "images_per_s_per_card": images_per_s,
            "pipeline_images_per_s_per_rank": float(np.median([r.pipeline_images_per_s for r in ranks])),
            "seed_step_ms": SEED_STEP_MS, "seed_images_per_s_per_card": SEED_IMAGES_PER_S}


def format_report(report: dict) -> str:
    """The table a person reads: each check, then the timings against the seed recipe."""
    lines = [f"preflight: hardware={report['hardware']} ({report['device_target']}), model={report['model']} "
             f"{report['image_size']} px, {report['batch_per_card']} images per card, AMP {report['amp_level']}, "
             f"kernels {report['kernels']}",
             f"{'check':<18} {'result':<6} finding"]
    lines += [f"{name:<18} {'ok' if ok else 'FAIL':<6} {finding}" for name, finding, ok in report["checks"]]
    lines += ["",
              f"{'':<26} {'this machine':>14} {'seed (8 x 910)':>16} {'speed':>7}",
              f"{'train step, ms':<26} {report['step_ms']:>14.1f} {report['seed_step_ms']:>16.1f} "
              f"{report['seed_step_ms'] / report['step_ms']:>7.3f}",
              f"{'train img/s per card':<26} {report['images_per_s_per_card']:>14.1f} "
              f"{report['seed_images_per_s_per_card']:>16.1f} "
              f"{report['images_per_s_per_card'] / report['seed_images_per_s_per_card']:>7.3f}",
              f"{'pipeline img/s per rank':<26} {report['pipeline_images_per_s_per_rank']:>14.1f} "
              f"{report['seed_images_per_s_per_card']:>16.1f} "
              f"{report['pipeline_images_per_s_per_rank'] / report['seed_images_per_s_per_card']:>7.3f}"]
    if report["model"] != "conformer_ti" or report["batch_per_card"] != 128 or report["image_size"] != 224:
        lines.append("(the seed's figures are Conformer-Ti at 224 px, 128 images per card: compare like with like "
                     "using model=conformer_ti data.image_size=224 data.batch_size=128)")
    return "\n".join(lines)


def _record(ctx: RunContext, report: dict) -> None:
    """Print the table, write preflight.json in the run dir, and log both to MLflow."""
    table = format_report(report)
    print(table, flush=True)
    log.info("preflight table:\n%s", table)
    path = ctx.run_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    tracker = task_tracker(ctx)
    with tracker:
        open_run(tracker, ctx, extra_tags={"preflight": "passed" if all(ok for *_, ok in report["checks"])
                                           else "failed"})
        tracker.log_metrics({"preflight/step_ms": report["step_ms"],
                             "preflight/images_per_s_per_card": report["images_per_s_per_card"],
                             "preflight/pipeline_images_per_s_per_rank": report["pipeline_images_per_s_per_rank"],
                             "preflight/reference_max_rel_error": max(r["parity_error"] for r in report["ranks"]),
                             "preflight/checks_failed": float(sum(not ok for *_, ok in report["checks"]))}, step=0)
        tracker.log_artifact(path)
        tracker.log_text(table + "\n", "preflight.txt")
