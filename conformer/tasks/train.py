"""task=train: fit the model, evaluate every epoch, checkpoint, record the run in MLflow."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conformer import weights
from conformer.hardware import replicas_in_sync
from conformer.logs import log_path
from conformer.tasks.common import (
    RunContext,
    build_data,
    build_network,
    log_datasets,
    open_run,
    resolve_weights,
    run_params,
    task_tracker,
)
from conformer.train.checkpoint import read_checkpoint_meta
from conformer.train.curves import plot_curves
from conformer.train.step import apply_amp
from conformer.train.trainer import Trainer
from conformer.validation import MLFLOW_PREFIX

log = logging.getLogger(__name__)
OUTPUTS_DIR = "outputs"  # run dirs under the project root (conf/config.yaml: hydra.run.dir, hydra.sweep.dir)


def train(ctx: RunContext) -> float:
    """Train as configured; returns the best value of `trainer.monitor` (the sweepers' objective)."""
    cfg, group = ctx.cfg, ctx.group
    data = build_data(cfg)
    network = build_network(cfg, data.num_classes)
    if cfg.model.pretrained:
        pretrained = resolve_weights(ctx, cfg.model.pretrained)
        weights.load_into(network, pretrained, fine_tune=not cfg.model.pretrained_strict)
    network = apply_amp(network, cfg.hardware.amp_level, workdir=ctx.run_dir)
    fingerprint = config_fingerprint(cfg)
    resume = _resume_from(ctx, fingerprint)
    tracker = task_tracker(ctx)
    trainer: Trainer = instantiate(cfg.trainer)(
        network=network, loss_fn=instantiate(cfg.loss), eval_loss_fn=instantiate(cfg.loss, label_smoothing=0.0),
        optimizer=instantiate(cfg.optim.optimizer), schedule=instantiate(cfg.optim.schedule,
                                                                         warmup_epochs=_warmup_epochs(cfg)),
        data=data, group=group, run_dir=ctx.run_dir, tracker=tracker, resume=resume,
        checkpoint_meta={"config_fingerprint": fingerprint, "params": run_params(cfg, group.world_size)})

    log.info("%s | %s | %d params | %d train / %d val images | %d steps/epoch | global batch %d | base lr %.3g",
             cfg.model.name, data, sum(p.size for p in network.trainable_params()), data.train_size,
             data.val_size, trainer.steps_per_epoch, trainer.global_batch, trainer.schedule.base_lr)
    monitor, checkpoints = cfg.trainer.monitor, trainer.checkpoints
    with tracker:
        open_run(tracker, ctx, resume_run_id=trainer.state.mlflow_run_id)
        log_datasets(tracker, cfg, data, {"train": data.train_size, "validation": data.val_size})
        try:
            state = trainer.fit()
            replicas_in_sync(network.trainable_params(), group)  # data-parallel ranks must agree (logged)
            best = checkpoints.best_metric if checkpoints.best_metric is not None else state.metrics.get(monitor)
            if group.is_main:  # before the log is uploaded: the train.log artifact ends with this summary
                log.info("done: %s %.2f (best %.2f at epoch %s) | run dir %s", monitor,
                         state.metrics.get(monitor, float("nan")), best, checkpoints.best_epoch, ctx.run_dir)
        finally:
            _log_outputs(tracker, ctx, trainer)
    return float(best)


def config_fingerprint(cfg: DictConfig) -> str:
    """What makes two runs "the same config" for `trainer.resume=auto`: the resolved config but the keys that say how
    to resume and how often to checkpoint (a run may resume with step checkpoints switched on)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "save_every_n_steps"):
        plain["trainer"].pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume_from(ctx: RunContext, fingerprint: str) -> Path | None:
    """The `last.ckpt` that `trainer.resume` names; for `auto`, the newest one under outputs/ of the same config."""
    spec = ctx.cfg.trainer.resume
    if not spec:
        return None
    if spec != "auto":
        last = resolve_weights(ctx, spec, "last.ckpt")
        if str(spec).startswith(MLFLOW_PREFIX) and not (last.parent / "best.ckpt").is_file():
            try:  # next to it, so the resumed run keeps its best weights (Trainer._carry_best)
                resolve_weights(ctx, spec, "best.ckpt")
            except LookupError:
                log.warning("%s has no best.ckpt: the resumed run's best.ckpt starts from its next improvement", spec)
        return last
    candidates = sorted(ctx.project_root.glob(f"{OUTPUTS_DIR}/**/checkpoints/last.ckpt"),
                        key=lambda path: path.stat().st_mtime, reverse=True)
    for path in candidates:
        if read_checkpoint_meta(path).get("config_fingerprint") == fingerprint:
            log.info("trainer.resume=auto: resuming the newest checkpoint of this config, %s", path)
            return path
    log.info("trainer.resume=auto: no checkpoint of this config under %s: starting afresh",
             ctx.project_root / OUTPUTS_DIR)
    return None


def _warmup_epochs(cfg: DictConfig) -> float:
    """The configured warmup; none for a run shorter than it (validation lets 1-epoch smoke runs through)."""
    warmup, epochs = cfg.optim.schedule.warmup_epochs, cfg.trainer.epochs
    if warmup < epochs:
        return warmup
    log.warning("optim.schedule.warmup_epochs=%s does not fit in trainer.epochs=%d: training without warmup",
                warmup, epochs)
    return 0


def _log_outputs(tracker, ctx: RunContext, trainer: Trainer) -> None:
    """Curves and log as artifacts (the checkpoints went in as they were saved): also after a failure, so a broken
    run can be inspected."""
    if not ctx.group.is_main:
        return
    if trainer.history:
        tracker.log_artifact(plot_curves(trainer.history, ctx.run_dir / "curves.png"))
    log_file = log_path(ctx.run_dir)
    if log_file.is_file():
        tracker.log_artifact(log_file)
