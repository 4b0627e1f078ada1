"""The training loop: built from `conf/trainer/` (`_target_`), it owns the step, the lr schedule, evaluation of
both heads, EMA, checkpoints and resuming."""
from __future__ import annotations

import itertools
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.experimental import optim

from conformer.models.checkpoint_file import read_checkpoint
from conformer.runtime.hardware import ProcessGroup, all_reduce_sum
from conformer.runtime.signals import check_interrupted, native_section
from conformer.train.arguments import check_sink_size
from conformer.train.checkpoint import CheckpointManager, TrainState
from conformer.train.ema import ModelEma
from conformer.train.losses import one_hot
from conformer.train.prefetch import prefetched
from conformer.train.profiling import StepProfiler
from conformer.train.progress import ProgressBar, bar_wanted
from conformer.train.step import DEFAULT_INIT_LOSS_SCALE, TrainStep
from conformer.train.window import StepWindow, Throughput
from conformer.vocabulary import HEADS

log = logging.getLogger(__name__)
EPOCH_KEY = "train/epoch"  # the epoch a training has completed, logged at its last step


class EvalStep(nn.Cell):
    """Sums for one eval batch: [loss_sum, count, top1 conv/trans/sum, top5 conv/trans/sum].

    A label of -1 marks a padding sample (`pad_batch`): it counts nowhere and its target is all zeros, so it adds
    nothing to the loss sum of a cross entropy.
    """

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell, num_classes: int) -> None:
        super().__init__(auto_prefix=False)  # a prefix would rename the network's parameters ("network.*")
        self.network, self.loss_fn = network, loss_fn
        self.k = min(5, num_classes)

    def _correct(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        _, top = ops.topk(logits, self.k)
        hits = (top == labels.reshape(-1, 1)).astype(ms.float32)  # a padding label (-1) hits no class
        return hits[:, 0].sum(), hits.sum()

    def construct(self, images: Tensor, labels: Tensor) -> Tensor:
        conv, trans = self.network(images)
        labels = labels.astype(ms.int32)
        valid = (labels >= 0).astype(ms.float32)
        targets = one_hot(ops.maximum(labels, 0), conv.shape[-1]) * valid.reshape(-1, 1)
        loss_sum = self.loss_fn((conv, trans), targets) * ops.cast(labels.shape[0], ms.float32)
        c1, c5 = self._correct(conv, labels)
        t1, t5 = self._correct(trans, labels)
        s1, s5 = self._correct(conv + trans, labels)
        return ops.stack([loss_sum, valid.sum(), c1, t1, s1, c5, t5, s5])


def pad_batch(images: Tensor, labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A short batch filled up to `size` with zero images labelled -1 (which `EvalStep` leaves out): the graph
    compiled for full batches serves the last one too, instead of a second compile for its shape."""
    missing = size - images.shape[0]
    if missing <= 0:
        return images, labels
    images, labels = images.asnumpy(), labels.asnumpy()
    return (Tensor(np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])),
            Tensor(np.concatenate([labels, np.full(missing, -1, labels.dtype)])))


def evaluate_batches(evaluator: EvalStep, batches: Iterable, group: ProcessGroup) -> dict[str, float]:
    """Metrics of `evaluator` over this rank's `batches`, summed over all ranks (every rank gets the same)."""
    evaluator.set_train(False)
    sums = np.zeros(8, dtype=np.float64)
    full = 0
    for index, (images, labels) in enumerate(batches):
        full = full or images.shape[0]  # the loader's batch size: only the last batch is shorter
        with native_section() if index == 0 else nullcontext():  # the first batch compiles the eval graph
            sums += evaluator(*pad_batch(images, labels, full)).asnumpy().astype(np.float64)
    evaluator.set_train(True)
    sums = all_reduce_sum(sums, group)
    if sums[1] == 0:
        raise RuntimeError("the val loader gave no images: nothing to evaluate")
    return eval_metrics(sums)


def eval_metrics(sums: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """Turn summed counts into percentages and the mean loss."""
    loss_sum, count = float(sums[0]), float(sums[1])
    metrics = {f"{prefix}/loss": loss_sum / count}
    for i, head in enumerate(HEADS):
        metrics[f"{prefix}/top1_{head}"] = 100.0 * float(sums[2 + i]) / count
        metrics[f"{prefix}/top5_{head}"] = 100.0 * float(sums[5 + i]) / count
    return metrics


class Trainer:
    """Trains `network` on `data` for `epochs`, evaluates every epoch, checkpoints on rank 0, reports to `tracker`.

    Built by Hydra from `conf/trainer/*.yaml` (`_partial_`), then completed by the train task with the components.
    `optimizer(network, lr=...)` and `schedule(epochs=..., steps_per_epoch=..., global_batch=...)` are factories
    (`conf/optim/`): the trainer computes, once, the steps per epoch and the global batch (images per optimizer
    update: batch_size x world size x grad_accum_steps) they need. `resume` (a `last.ckpt`) restores weights,
    optimizer, EMA, epoch, step and best metric before the step is compiled. `save_every_n_steps` also writes
    `last.ckpt` inside epochs; a resume from one skips the batches its epoch already trained (drawn again from the
    epoch's seeded pipeline, so the rest of the epoch is the same).

    Debugging (conf/debug/): `limit_train_batches` / `limit_val_batches` cut every epoch short, `overfit_batches`
    trains on the first k batches over and over (the loss must fall), `profile_steps` profiles that many steps.
    """

    def __init__(self, *, network: nn.Cell, loss_fn: nn.Cell, eval_loss_fn: nn.Cell,
                 optimizer: Callable[..., optim.Optimizer], schedule: Callable[..., Any], data: Any,
                 group: ProcessGroup, run_dir: Path, tracker: Any, epochs: int, grad_accum_steps: int = 1,
                 clip_grad_norm: float | None = None, loss_scale: str = "none",
                 init_loss_scale: float = DEFAULT_INIT_LOSS_SCALE, scale_factor: int = 2, scale_window: int = 2000,
                 ema_decay: float | None = None,
                 monitor: str = "val/top1_sum", monitor_mode: str = "max", log_every_n_steps: int = 10,
                 resume: str | Path | None = None, checkpoint_meta: Mapping[str, Any] | None = None,
                 keep_top_k: int = 1, limit_train_batches: int | None = None,
                 limit_val_batches: int | None = None, overfit_batches: int | None = None,
                 profile_steps: int | None = None, progress_bar: str | bool = "auto",
                 save_every_n_steps: int | None = None, sink_size: int | None = None) -> None:
        self.data, self.group, self.tracker = data, group, tracker
        self.epochs, self.log_every_n_steps = int(epochs), int(log_every_n_steps)
        self.steps_per_epoch = data.steps_per_epoch(group.world_size)
        if overfit_batches and limit_train_batches:  # the same batches repeat: any epoch length works
            self.steps_per_epoch = int(limit_train_batches)
        elif limit_train_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, int(limit_train_batches))
        self.limit_val_batches, self.overfit_batches = limit_val_batches, overfit_batches
        self._overfit_cache: list[tuple[Tensor, Tensor]] = []
        self.bar = ProgressBar(bar_wanted(progress_bar, group.is_main))
        self.profiler = StepProfiler(profile_steps, run_dir, tracker, quiet=self.bar.paused)
        if self.steps_per_epoch < grad_accum_steps:
            raise ValueError(f"trainer.grad_accum_steps={grad_accum_steps} exceeds the {self.steps_per_epoch} steps "
                             "of an epoch")
        check_sink_size(sink_size, ms.get_context("device_target"), grad_accum_steps, log_every_n_steps,
                        overfit_batches, save_every_n_steps)
        if sink_size and self.steps_per_epoch % sink_size:
            raise ValueError(f"trainer.sink_size={sink_size} must divide the {self.steps_per_epoch} steps of an epoch")
        self.sink_size = sink_size
        self.images_per_step = data.batch_size * group.world_size
        self.global_batch = self.images_per_step * grad_accum_steps
        self.schedule = schedule(epochs=self.epochs, steps_per_epoch=self.steps_per_epoch // grad_accum_steps,
                                 global_batch=self.global_batch)
        self.lr_values = self.schedule.values()
        self.optimizer = optimizer(network, lr=self.schedule(0))
        self.ema = ModelEma(network, decay=ema_decay) if ema_decay else None
        self.checkpoints = CheckpointManager(Path(run_dir) / "checkpoints", monitor=monitor, mode=monitor_mode,
                                             keep_top_k=keep_top_k)
        self.monitor, self.checkpoint_meta = monitor, dict(checkpoint_meta or {})
        self.save_every_n_steps = save_every_n_steps
        self.dynamic_loss_scale = loss_scale == "dynamic"
        self.step = TrainStep(network, loss_fn, self.optimizer, clip_grad_norm=clip_grad_norm, loss_scale=loss_scale,
                              init_loss_scale=init_loss_scale, scale_factor=scale_factor, scale_window=scale_window,
                              grad_accum_steps=grad_accum_steps, ema=self.ema, window=self.log_every_n_steps,
                              lr_values=self.lr_values, mask_seed=(int(data.seed), group.rank))
        self.state = self._resume(Path(resume), network) if resume else TrainState()
        self.evaluator = EvalStep(network, eval_loss_fn, data.num_classes)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._compiled = False
        self._logged_train_step: int | None = None  # the last step of train/* a resumed run's MLflow run holds

    def _resume(self, path: Path, network: nn.Cell) -> TrainState:
        """Restore a `last.ckpt` (the compiled step would not see later assignments), and carry its run's best."""
        state = self.checkpoints.load(path, network, self.optimizer, self.ema, step_state=self.step)
        self._carry_best(path.parent / self.checkpoints.best_path.name)
        log.info("resumed from %s at epoch %d (best %s=%s)", path, state.epoch, self.monitor, state.best_metric)
        return state

    def _carry_best(self, source: Path) -> None:
        """Copy the resumed run's best checkpoint into this run's dir when it is the best the resumed state knows.

        A later, worse epoch then leaves it in place, and this run's `best.ckpt` is its best weights so far.
        """
        target, best_epoch = self.checkpoints.best_path, self.checkpoints.best_epoch
        if best_epoch is None or not source.is_file() or source.resolve() == target.resolve():
            return
        _, extra = read_checkpoint(source)
        if extra.get("epoch") != best_epoch:
            log.warning("%s is from epoch %s, not the best epoch %s of the resumed run: not carried over", source,
                        extra.get("epoch"), best_epoch)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        log.info("best checkpoint of epoch %d carried over from %s", best_epoch, source)

    def _log(self, metrics: dict[str, float], step: int, to_tracker: bool = True) -> None:
        for key, value in metrics.items():
            self.history[key].append((step, value))
        if to_tracker:
            self.tracker.log_metrics(metrics, step=step)

    def fit(self) -> TrainState:
        """Train from the current state (epoch 0, or the resumed one) to `epochs`; returns the final state."""
        state = self.state
        epochs, start = self.epochs, state.epoch
        if start >= epochs:
            log.info("checkpoint is at epoch %d of %d: nothing left to train", start, epochs)
            return state
        val_loader = self.data.val_loader(self.group.rank, self.group.world_size, self.limit_val_batches)
        val_iter = val_loader.create_tuple_iterator(num_epochs=epochs - start)
        step = state.step
        self.step.seek(step)  # the graph's counter: the lr and drop-path masks of a resumed run follow it
        # a resumed run: the killed process may have logged an epoch's metrics and died before its checkpoint; that
        # epoch is trained again to the same values, which are not logged twice
        logged = self.tracker.last_step(EPOCH_KEY) if step > 0 else None
        # ... and so were the per-step metrics of the epoch it was in, and perhaps not the best/* of its last epoch
        self._logged_train_step = self.tracker.last_step("train/loss") if step > 0 else None
        best_logged = self.tracker.last_step(f"best/{self.monitor}") if step > 0 else None
        if start > 0 and self.checkpoints.best_path.is_file():  # carried over from the resumed run
            self.tracker.log_checkpoint(self.checkpoints.best_path)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            done = state.epoch_step if epoch == start else 0  # a mid-epoch checkpoint's batches
            # the next batch read while this one trains, or (sinking) read by the device itself
            batches = self._sunk_steps(epoch, done) if self.sink_size else prefetched(self._epoch_batches(epoch, done))
            step, train_loss = self._train_epoch(batches, epoch, step, done)
            metrics = {EPOCH_KEY: float(epoch + 1), "train/loss_epoch": train_loss, **self.evaluate(val_iter),
                       **self._skipped_images()}
            metrics["time/epoch_s"] = time.perf_counter() - t0
            repeated = logged is not None and step <= logged
            if repeated:
                log.info("epoch %d's metrics are in the MLflow run already (logged before the process was killed)",
                         epoch + 1)
            # the global step, so val curves line up with the train curves
            self._log(metrics, step=step, to_tracker=not repeated)
            saved = self._checkpoint(epoch + 1, step, metrics)
            self._track_checkpoints(saved)
            best_missing = not repeated or best_logged is None or best_logged < step  # (killed before logging it)
            if "best" in saved and best_missing:  # the runs table's column of the best value, and when it came
                self.tracker.log_metrics({f"best/{self.monitor}": self.checkpoints.best_metric,
                                          "best/epoch": float(self.checkpoints.best_epoch)}, step=step)
            state = self.state = TrainState(epoch=epoch + 1, step=step, best_metric=self.checkpoints.best_metric,
                                            best_epoch=self.checkpoints.best_epoch, metrics=metrics)
            log.info("epoch %d/%d  train loss %.4f  val loss %.4f  top-1 sum %.2f%%  conv %.2f%%  trans %.2f%%  "
                     "(%.1f s)%s", epoch + 1, epochs, train_loss, metrics["val/loss"], metrics["val/top1_sum"],
                     metrics["val/top1_conv"], metrics["val/top1_trans"], metrics["time/epoch_s"],
                     "  * best" if "best" in saved else "")
        return state

    def _train_epoch(self, batches: Iterator, epoch: int, step: int, done: int = 0) -> tuple[int, float]:
        """Train the epoch's batches after the first `done` (those a mid-epoch checkpoint holds); returns the global
        step and the mean loss of the batches trained here.

        The steps are only launched: their records are read back once per log window (at a log point, a step
        checkpoint, the compile step and the epoch's end), which is where a non-finite loss is caught.
        """
        every = self.log_every_n_steps
        meter, window, unread_from = Throughput(), StepWindow(epoch), step
        for i, batch in enumerate(batches, start=done):
            check_interrupted()
            # the lr the graph takes from its table for this step, for the log
            lr = float(self.lr_values[min(step // self.step.grad_accum_steps, len(self.lr_values) - 1)])
            compiling = not self._compiled
            if compiling:
                self._first_step(batch, step)
            elif batch is not None:  # None: a step of the sink call `_sunk_steps` made
                self.step.launch(*batch)
            step += 1
            self.profiler.after_step()
            log_due = step % every == 0 or i + 1 == self.steps_per_epoch
            checkpoint_due = self._step_checkpoint_due(step, i)
            if compiling or log_due or checkpoint_due:
                window.add(self.step.results(), unread_from)
                unread_from = step
            if checkpoint_due:
                self._save_step_checkpoint(epoch, i + 1, step)
            if compiling:
                meter.reset()  # compile time stays out of img/s and the ETA
                self.bar.start(f"epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch)
                self.bar.advance(i + 1)
            else:
                meter.add(self.images_per_step)
            if log_due and window.counted:
                rate = meter.rate()
                metrics = {"train/loss": window.mean_loss, "train/lr": lr, "train/img_per_s": rate,
                           "train/grad_norm": window.mean_norm}
                if self.dynamic_loss_scale:  # any other scale is constant: its chart would be a flat line
                    metrics["train/loss_scale"] = window.loss_scale
                if compiling:  # a window of the compile step alone has no throughput to report
                    del metrics["train/img_per_s"]
                logged = self._logged_train_step  # a resumed run: steps the killed process logged are not repeated
                self._log(metrics, step=step, to_tracker=logged is None or step > logged)
                left_in_epoch = self.steps_per_epoch - i - 1
                left_total = left_in_epoch + (self.epochs - epoch - 1) * self.steps_per_epoch
                per_step = self.images_per_step / rate if rate > 0 else math.nan
                log.info("epoch %d step %d/%d  loss %.4f  lr %.3e  %.0f img/s  eta epoch %s, train %s", epoch + 1,
                         i + 1, self.steps_per_epoch, metrics["train/loss"], lr, rate,
                         _clock(left_in_epoch * per_step), _clock(left_total * per_step), extra={"progress": True})
                self.bar.advance(0, loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}",
                                 eta=_clock(left_total * per_step))
            if log_due:
                window.reset()
                if not compiling:
                    meter.reset()
            if not compiling:
                self.bar.advance()
        window.add(self.step.results(), unread_from)  # a loader that ran out before the epoch's last step
        self.bar.stop()
        if window.epoch_n == 0:
            raise RuntimeError(f"no update was applied in epoch {epoch + 1}: the loader gave no batches or every "
                               "step overflowed (see train/loss_scale; under AMP, lower trainer.init_loss_scale)")
        return step, window.epoch_loss / window.epoch_n

    def _epoch_batches(self, epoch: int, done: int = 0) -> Iterator:
        """Epoch `epoch`'s train batches after the first `done` (with `overfit_batches`: the first k batches of
        epoch 0, cycled)."""
        if self.overfit_batches:
            if not self._overfit_cache:
                self._overfit_cache = list(itertools.islice(self._seeded_batches(0), int(self.overfit_batches)))
            return itertools.islice(itertools.cycle(self._overfit_cache), done, self.steps_per_epoch)
        return itertools.islice(self._seeded_batches(epoch), done, self.steps_per_epoch)

    def _sunk_steps(self, epoch: int, done: int) -> Iterator[None]:
        """Data sinking: one `sink_size` call of the step on the device per `sink_size` steps, reading epoch
        `epoch`'s pipeline after its first `done` batches; a None per step for the loop's bookkeeping."""
        loader = self._seeded_loader(epoch)
        loader = loader.skip(done) if done else loader
        for index in range(done, self.steps_per_epoch):
            if (index - done) % self.sink_size == 0:
                self.step.sink(loader, self.sink_size)
            yield None

    def _seeded_batches(self, epoch: int) -> Iterator:
        return self._seeded_loader(epoch).create_tuple_iterator(num_epochs=1)

    def _seeded_loader(self, epoch: int) -> ds.Dataset:
        """A pipeline seeded by (seed, epoch): the sample order, the augmentations and Mixup of an epoch are the
        same whether the run got there in one go or resumed (with one data worker, bit for bit)."""
        seed = np.random.SeedSequence([int(self.data.seed), epoch]).generate_state(1)[0]
        random.seed(int(seed))
        np.random.seed(int(seed))
        ds.config.set_seed(int(seed))
        return self.data.train_loader(self.group.rank, self.group.world_size, start_epoch=epoch)

    def _skipped_images(self) -> dict[str, float]:
        """Bad image files skipped so far, per split, over all ranks (`data.on_bad_image=skip`): a split's count from
        its first bad file on (a chart of zeros says nothing)."""
        skipped = getattr(self.data, "skipped_images", None)
        if skipped is None:
            return {}
        splits = sorted(skipped)
        counts = all_reduce_sum(np.array([skipped[split] for split in splits], np.float64), self.group)
        return {f"data/skipped_images_{split}": float(count) for split, count in zip(splits, counts) if count > 0}

    def _first_step(self, batch: tuple[Tensor, Tensor] | None, step: int) -> None:
        """The first call compiles the step graph: its own log line and metric, out of the throughput."""
        log.info("compiling the train step ...")
        start = time.perf_counter()
        with native_section():
            if batch is not None:
                self.step.launch(*batch)
        seconds = time.perf_counter() - start
        log.info("train step compiled and run once in %.1f s", seconds)
        self.tracker.log_metrics({"time/compile_train_step_s": seconds}, step=step)
        self._compiled = True

    def evaluate(self, batches: Iterator) -> dict[str, float]:
        """Eval every head on one epoch of this rank's val batches (the loader's first `limit_val_batches` with that
        limit), summed over ranks (every rank returns the same numbers)."""
        self.bar.start("eval", total=self.limit_val_batches or None)
        try:
            with self.ema.swapped() if self.ema is not None else nullcontext():
                return evaluate_batches(self.evaluator, self._counted(batches), self.group)
        finally:
            self.bar.stop()

    def _counted(self, batches: Iterable) -> Iterator:
        for batch in batches:
            yield batch
            self.bar.advance()

    def _step_checkpoint_due(self, step: int, index: int) -> bool:
        """Every `save_every_n_steps` global steps, on an update (no accumulation pending), not at an epoch's end
        (the epoch's own checkpoint follows)."""
        n = self.save_every_n_steps
        return bool(n) and self.group.is_main and step % n == 0 and self.step.micro_step == 0 and \
            index + 1 < self.steps_per_epoch

    def _save_step_checkpoint(self, epoch: int, done: int, step: int) -> None:
        meta = {**self.checkpoint_meta, "mlflow_run_id": self.tracker.run_id}
        path = self.checkpoints.save_last(self.step.network, self.step.optimizer, self.ema, epoch=epoch,
                                          epoch_step=done, step=step, step_state=self.step, meta=meta)
        self.tracker.log_checkpoint(path)
        log.info("step checkpoint: epoch %d step %d/%d -> %s", epoch + 1, done, self.steps_per_epoch, path.name)

    def _track_checkpoints(self, saved: Mapping[str, Path]) -> None:
        """The files this save wrote into the MLflow run (best first), the ranked ones it removed out of it."""
        for key in ("best", "last", "ranked"):
            if key in saved:
                self.tracker.log_checkpoint(saved[key])
        for path in self.checkpoints.dropped:
            self.tracker.forget_checkpoint(path.name)

    def _checkpoint(self, epoch: int, step: int, metrics: dict[str, float]) -> dict:
        if not self.group.is_main:
            return {}
        meta = {**self.checkpoint_meta, "mlflow_run_id": self.tracker.run_id}
        return self.checkpoints.save(self.step.network, self.step.optimizer, self.ema, epoch=epoch, step=step,
                                     metrics=metrics, step_state=self.step, meta=meta)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
