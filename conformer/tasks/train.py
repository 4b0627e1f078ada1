"""task=train: fit the model, evaluate every epoch, checkpoint, record the run in MLflow."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hydra.utils import instantiate

from conformer.hardware import replicas_in_sync
from conformer.runtime import LOG_FILE, RunContext, build_data, build_network, open_run, task_tracker
from conformer.schedules import scale_lr
from conformer.tracking import plot_curves
from conformer.train.checkpoint import CheckpointManager, TrainState, read_checkpoint
from conformer.train.ema import ModelEma
from conformer.train.step import TrainStep, apply_amp
from conformer.train.trainer import EvalStep, Trainer, TrainerConfig

log = logging.getLogger(__name__)


def train(ctx: RunContext) -> float:
    """Train as configured; returns the best value of `trainer.monitor` (the sweepers' objective)."""
    cfg, group = ctx.cfg, ctx.group
    data = build_data(cfg)
    network = build_network(cfg, data.num_classes)
    network.check_input_shape((data.batch_size, network.in_chans, data.image_size, data.image_size))
    network = apply_amp(network, cfg.hardware.amp_level, workdir=ctx.run_dir)
    loss_fn = instantiate(cfg.loss)
    eval_loss = instantiate(cfg.loss, label_smoothing=0.0)

    tcfg = cfg.trainer
    accum = int(tcfg.grad_accum_steps)
    steps_per_epoch = data.steps_per_epoch(group.world_size)
    if steps_per_epoch < accum:
        raise ValueError(f"trainer.grad_accum_steps={accum} exceeds the {steps_per_epoch} steps of an epoch")
    global_batch = data.batch_size * group.world_size * accum
    base_lr = scale_lr(cfg.optim.schedule.base_lr, global_batch, cfg.optim.reference_batch_size, cfg.optim.lr_scaling)
    schedule = instantiate(cfg.optim.schedule, base_lr=base_lr, warmup_epochs=_warmup_epochs(cfg))(
        epochs=tcfg.epochs, steps_per_epoch=steps_per_epoch // accum)
    optimizer = instantiate(cfg.optim.optimizer)(network, lr=schedule(0))
    ema = ModelEma(network, decay=tcfg.ema_decay) if tcfg.ema_decay else None

    checkpoints = CheckpointManager(ctx.run_dir / "checkpoints", monitor=tcfg.monitor, mode=tcfg.monitor_mode)
    state = TrainState()
    if tcfg.resume:  # before the step is compiled: the compiled step would not see later assignments
        resume = Path(tcfg.resume).expanduser()
        state = checkpoints.load(resume, network, optimizer, ema)
        _carry_best(resume.parent / checkpoints.best_path.name, checkpoints)
        log.info("resumed from %s at epoch %d (best %s=%s)", tcfg.resume, state.epoch, tcfg.monitor,
                 state.best_metric)
    step = TrainStep(network, loss_fn, optimizer, clip_grad_norm=tcfg.clip_grad_norm, loss_scale=tcfg.loss_scale,
                     init_loss_scale=tcfg.init_loss_scale, scale_factor=tcfg.scale_factor,
                     scale_window=tcfg.scale_window, grad_accum_steps=accum, ema=ema)
    tracker = task_tracker(ctx)
    trainer = Trainer(step=step, evaluator=EvalStep(network, eval_loss, data.num_classes),
                      lr_values=schedule.values(), data=data, group=group, checkpoints=checkpoints, tracker=tracker,
                      config=TrainerConfig(epochs=tcfg.epochs, log_every_n_steps=tcfg.log_every_n_steps),
                      ema=ema)

    log.info("%s | %s | %d params | %d train / %d val images | %d steps/epoch | global batch %d | base lr %.3g",
             cfg.model.name, data, sum(p.size for p in network.trainable_params()), data.train_size,
             data.val_size, steps_per_epoch, global_batch, base_lr)
    with tracker:
        open_run(tracker, ctx, "train")
        try:
            state = trainer.fit(state)
            replicas_in_sync(network.trainable_params(), group)  # data-parallel ranks must agree (logged)
            best = checkpoints.best_metric if checkpoints.best_metric is not None else state.metrics.get(tcfg.monitor)
            if group.is_main:  # before the log is uploaded: the train.log artifact ends with this summary
                log.info("done: %s %.2f (best %.2f at epoch %s) | run dir %s", tcfg.monitor,
                         state.metrics.get(tcfg.monitor, float("nan")), best, checkpoints.best_epoch, ctx.run_dir)
        finally:
            _log_outputs(tracker, ctx, trainer, checkpoints, cfg.tracking.log_checkpoints)
    return float(best)


def _warmup_epochs(cfg) -> float:
    """The configured warmup; none for a run shorter than it (validation lets 1-epoch smoke runs through)."""
    warmup, epochs = cfg.optim.schedule.warmup_epochs, cfg.trainer.epochs
    if warmup < epochs:
        return warmup
    log.warning("optim.schedule.warmup_epochs=%s does not fit in trainer.epochs=%d: training without warmup",
                warmup, epochs)
    return 0


def _carry_best(source: Path, checkpoints: CheckpointManager) -> None:
    """Copy the resumed run's best checkpoint into this run's dir when it is the best the resumed state knows.

    A later, worse epoch then leaves it in place, and this run's `best.ckpt` is its best weights so far.
    """
    target = checkpoints.best_path
    if checkpoints.best_epoch is None or not source.is_file() or source.resolve() == target.resolve():
        return
    _, extra = read_checkpoint(source)
    if extra.get("epoch") != checkpoints.best_epoch:
        log.warning("%s is from epoch %s, not the best epoch %s of the resumed run: not carried over", source,
                    extra.get("epoch"), checkpoints.best_epoch)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    log.info("best checkpoint of epoch %d carried over from %s", checkpoints.best_epoch, source)


def _log_outputs(tracker, ctx: RunContext, trainer: Trainer, checkpoints: CheckpointManager,
                 with_checkpoints: bool) -> None:
    """Curves, log and checkpoints as artifacts: also after a failure, so a broken run can be inspected."""
    if not ctx.group.is_main:
        return
    if trainer.history:
        tracker.log_artifact(plot_curves(trainer.history, ctx.run_dir / "curves.png"))
    log_file = ctx.run_dir / LOG_FILE
    if log_file.is_file():
        tracker.log_artifact(log_file)
    if with_checkpoints:
        for path in (checkpoints.last_path, checkpoints.best_path):
            if path.is_file():
                tracker.log_artifact(path, "checkpoints")
