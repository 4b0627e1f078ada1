"""task=train: fit the model, evaluate every epoch, checkpoint, record the run in MLflow."""
from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from conformer import weights
from conformer.hardware import replicas_in_sync
from conformer.logs import log_path
from conformer.tasks.common import RunContext, build_data, build_network, open_run, resolve_weights, task_tracker
from conformer.train.curves import plot_curves
from conformer.train.step import apply_amp
from conformer.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(ctx: RunContext) -> float:
    """Train as configured; returns the best value of `trainer.monitor` (the sweepers' objective)."""
    cfg, group = ctx.cfg, ctx.group
    data = build_data(cfg)
    network = build_network(cfg, data.num_classes)
    if cfg.model.pretrained:
        weights.load_into(network, resolve_weights(ctx, cfg.model.pretrained))
    network = apply_amp(network, cfg.hardware.amp_level, workdir=ctx.run_dir)
    resume = resolve_weights(ctx, cfg.trainer.resume, "last.ckpt") if cfg.trainer.resume else None
    tracker = task_tracker(ctx)
    trainer: Trainer = instantiate(cfg.trainer)(
        network=network, loss_fn=instantiate(cfg.loss), eval_loss_fn=instantiate(cfg.loss, label_smoothing=0.0),
        optimizer=instantiate(cfg.optim.optimizer), schedule=instantiate(cfg.optim.schedule,
                                                                         warmup_epochs=_warmup_epochs(cfg)),
        data=data, group=group, run_dir=ctx.run_dir, tracker=tracker, resume=resume)

    log.info("%s | %s | %d params | %d train / %d val images | %d steps/epoch | global batch %d | base lr %.3g",
             cfg.model.name, data, sum(p.size for p in network.trainable_params()), data.train_size,
             data.val_size, trainer.steps_per_epoch, trainer.global_batch, trainer.schedule.base_lr)
    monitor, checkpoints = cfg.trainer.monitor, trainer.checkpoints
    with tracker:
        open_run(tracker, ctx)
        try:
            state = trainer.fit()
            replicas_in_sync(network.trainable_params(), group)  # data-parallel ranks must agree (logged)
            best = checkpoints.best_metric if checkpoints.best_metric is not None else state.metrics.get(monitor)
            if group.is_main:  # before the log is uploaded: the train.log artifact ends with this summary
                log.info("done: %s %.2f (best %.2f at epoch %s) | run dir %s", monitor,
                         state.metrics.get(monitor, float("nan")), best, checkpoints.best_epoch, ctx.run_dir)
        finally:
            _log_outputs(tracker, ctx, trainer, cfg.tracking.log_checkpoints)
    return float(best)


def _warmup_epochs(cfg: DictConfig) -> float:
    """The configured warmup; none for a run shorter than it (validation lets 1-epoch smoke runs through)."""
    warmup, epochs = cfg.optim.schedule.warmup_epochs, cfg.trainer.epochs
    if warmup < epochs:
        return warmup
    log.warning("optim.schedule.warmup_epochs=%s does not fit in trainer.epochs=%d: training without warmup",
                warmup, epochs)
    return 0


def _log_outputs(tracker, ctx: RunContext, trainer: Trainer, with_checkpoints: bool) -> None:
    """Curves, log and checkpoints as artifacts: also after a failure, so a broken run can be inspected."""
    if not ctx.group.is_main:
        return
    if trainer.history:
        tracker.log_artifact(plot_curves(trainer.history, ctx.run_dir / "curves.png"))
    log_file = log_path(ctx.run_dir)
    if log_file.is_file():
        tracker.log_artifact(log_file)
    if with_checkpoints:
        for path in (trainer.checkpoints.last_path, trainer.checkpoints.best_path):
            if path.is_file():
                tracker.log_artifact(path, "checkpoints")
