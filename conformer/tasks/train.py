"""task=train: fit the model, evaluate every epoch, checkpoint, record the run in MLflow."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate

from conformer.hardware import replicas_in_sync
from conformer.runtime import LOG_FILE, RunContext, build_data, build_network, open_run
from conformer.schedules import scale_lr
from conformer.tracking import create_tracker, plot_curves
from conformer.train.checkpoint import CheckpointManager, TrainState
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
    schedule = instantiate(cfg.optim.schedule, base_lr=base_lr)(epochs=tcfg.epochs,
                                                                steps_per_epoch=steps_per_epoch // accum)
    optimizer = instantiate(cfg.optim.optimizer)(network, lr=schedule(0))
    ema = ModelEma(network, decay=tcfg.ema_decay) if tcfg.ema_decay else None

    checkpoints = CheckpointManager(ctx.run_dir / "checkpoints", monitor=tcfg.monitor, mode=tcfg.monitor_mode)
    state = TrainState()
    if tcfg.resume:  # before the step is compiled: the compiled step would not see later assignments
        state = checkpoints.load(Path(tcfg.resume).expanduser(), network, optimizer, ema)
        log.info("resumed from %s at epoch %d (best %s=%s)", tcfg.resume, state.epoch, tcfg.monitor,
                 state.best_metric)
    step = TrainStep(network, loss_fn, optimizer, clip_grad_norm=tcfg.clip_grad_norm, loss_scale=tcfg.loss_scale,
                     init_loss_scale=tcfg.init_loss_scale, scale_factor=tcfg.scale_factor,
                     scale_window=tcfg.scale_window, grad_accum_steps=accum, ema=ema)
    tracker = create_tracker(cfg.tracking, ctx.project_root, is_main=group.is_main)
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
        finally:
            _log_outputs(tracker, ctx, trainer, checkpoints, cfg.tracking.log_checkpoints)
    best = checkpoints.best_metric if checkpoints.best_metric is not None else state.metrics.get(tcfg.monitor)
    if group.is_main:
        log.info("done: %s %.2f (best %.2f at epoch %s) | run dir %s", tcfg.monitor,
                 state.metrics.get(tcfg.monitor, float("nan")), best, checkpoints.best_epoch, ctx.run_dir)
    return float(best)


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
