"""task=train: fit the model, evaluate every epoch, checkpoint, record the run in MLflow."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conformer.errors import CheckpointError, ConfigError, InsufficientSpace
from conformer.models.checkpoint_file import read_checkpoint_meta
from conformer.models.registry import is_conformer, model_name
from conformer.runtime.hardware import replicas_in_sync
from conformer.runtime.logs import log_path
from conformer.runtime.runlock import RunInUse, RunLock
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
from conformer.train.curves import plot_curves
from conformer.train.schedules import fitting_warmup
from conformer.train.step import apply_amp
from conformer.train.trainer import Trainer
from conformer.vocabulary import MLFLOW_PREFIX

log = logging.getLogger(__name__)
OUTPUTS_DIR = "outputs"  # run dirs under the project root (conf/config.yaml: hydra.run.dir, hydra.sweep.dir)


def train(ctx: RunContext) -> float:
    """Train as configured; returns the best value of `trainer.monitor` (the sweepers' objective)."""
    cfg, group = ctx.cfg, ctx.group
    fingerprint = config_fingerprint(cfg)
    with ExitStack() as owned:
        resume = _resume_from(ctx, fingerprint)
        if group.is_main:  # one owner per training: this run dir, and the one it continues (conformer.runtime.runlock)
            try:
                owned.enter_context(RunLock(ctx.run_dir))
                if resume is not None and resume.parent.name == "checkpoints" and resume.parent.parent != ctx.run_dir:
                    lock = _lock_if_writable(resume.parent.parent)
                    if lock is not None:
                        owned.callback(lock.release)
            except RunInUse as err:
                raise ConfigError(f"trainer.resume={cfg.trainer.resume}: {err}") from err
        return _train(ctx, fingerprint, resume)


def _train(ctx: RunContext, fingerprint: str, resume: Path | None) -> float:
    cfg, group = ctx.cfg, ctx.group
    data = build_data(cfg)
    spec = cfg.model.get("pretrained") if is_conformer(cfg.model) else None
    network = build_network(cfg, data.num_classes, resolve_weights(ctx, spec) if spec else None)
    network = apply_amp(network, cfg.hardware.amp_level, workdir=ctx.run_dir)
    tracker = task_tracker(ctx)
    trainer: Trainer = instantiate(cfg.trainer)(
        network=network, loss_fn=instantiate(cfg.loss), eval_loss_fn=instantiate(cfg.loss, label_smoothing=0.0),
        optimizer=instantiate(cfg.optim.optimizer), schedule=instantiate(cfg.optim.schedule,
                                                                         warmup_epochs=_warmup_epochs(cfg)),
        data=data, group=group, run_dir=ctx.run_dir, tracker=tracker, resume=resume,
        checkpoint_meta={"config_fingerprint": fingerprint, "params": run_params(cfg, group.world_size)})

    if group.is_main:
        check_free_space(ctx.run_dir, network, ema=bool(cfg.trainer.get("ema_decay")),
                         margin_mb=cfg.task.free_space_margin_mb)
    log.info("%s | %s | %d params | %d train / %d val images | %d steps/epoch | global batch %d | base lr %.3g",
             model_name(cfg.model), data, sum(p.size for p in network.trainable_params()), data.train_size,
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
            if group.is_main and resume is not None and not trainer.checkpoints.last_path.is_file():
                # nothing was left to train: the run's checkpoints stay where they are (mlflow:<run_id> finds them)
                tracker.set_tags({"run_dir": str(resume.parent.parent)})
        finally:
            _log_outputs(tracker, ctx, trainer, resume)
    return float(best)


def check_free_space(run_dir: Path, network, ema: bool = False, margin_mb: float = 64) -> None:
    """Before the first step: the run dir's file system holds two checkpoints (last.ckpt and its atomic temp copy;
    best.ckpt shares last's bytes) plus `margin_mb` (`task.free_space_margin_mb`), or `InsufficientSpace` says how
    much is missing. A checkpoint holds the weights, AdamW's two moments and the EMA copy: ~4 (or 3) float32 per
    parameter."""
    copies = 4 if ema else 3
    checkpoint = sum(p.size for p in network.get_parameters()) * 4 * copies
    needed = 2 * checkpoint + int(margin_mb * 2**20)
    free = shutil.disk_usage(run_dir if run_dir.exists() else run_dir.parent).free
    if free < needed:
        raise InsufficientSpace(errno.ENOSPC, f"not enough free space for the checkpoints in {run_dir}: "
                                f"{free / 2**20:.0f} MB free, the training needs about {needed / 2**20:.0f} MB "
                                f"(two checkpoints of {checkpoint / 2**20:.1f} MB and task.free_space_margin_mb="
                                f"{margin_mb}): free some space or point hydra.run.dir (or paths.root) elsewhere",
                                str(run_dir))


def config_fingerprint(cfg: DictConfig) -> str:
    """What makes two runs "the same config" for `trainer.resume=auto`: the resolved config but the keys that say how
    to resume, how often to checkpoint (a run may resume with step checkpoints switched on) and how much free space
    to ask for."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "save_every_n_steps"):
        plain["trainer"].pop(key, None)
    plain["task"].pop("free_space_margin_mb", None)
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
    candidates = sorted(_modified(ctx.project_root.glob(f"{OUTPUTS_DIR}/**/checkpoints/last.ckpt")), reverse=True)
    for _, path in candidates:
        try:
            meta = read_checkpoint_meta(path)
        except (CheckpointError, OSError) as err:  # one broken file must not stop the search (nor be resumed)
            log.warning("trainer.resume=auto: skipping %s: %s", path, str(err).splitlines()[0])
            continue
        if meta.get("config_fingerprint") == fingerprint:
            log.info("trainer.resume=auto: resuming the newest checkpoint of this config, %s", path)
            return path
    log.info("trainer.resume=auto: no checkpoint of this config under %s: starting afresh",
             ctx.project_root / OUTPUTS_DIR)
    return None


def _lock_if_writable(folder: Path) -> RunLock | None:
    """The lock of the run dir a training continues, acquired; None where it cannot be written (read-only
    storage)."""
    try:
        return RunLock(folder).acquire()
    except PermissionError:
        return None


def _modified(paths: Iterable[Path]) -> list[tuple[float, Path]]:
    """(modification time, path) of the files that still exist (another run may remove one meanwhile)."""
    found = []
    for path in paths:
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    return found


def _warmup_epochs(cfg: DictConfig) -> float:
    """The configured warmup; none for a one-epoch run (`fitting_warmup`: validation lets such smoke runs through)."""
    warmup = fitting_warmup(cfg.optim.schedule.warmup_epochs, cfg.trainer.epochs)
    if warmup != cfg.optim.schedule.warmup_epochs:
        log.warning("optim.schedule.warmup_epochs=%s does not fit in trainer.epochs=%d: training without warmup",
                    cfg.optim.schedule.warmup_epochs, cfg.trainer.epochs)
    return warmup


WHOLE_LOG = Path(".resumed") / "train.log"  # in a resumed training's run dir: the log of all its parts


def whole_log(run_dir: Path, resume: Path | None) -> Path:
    """This run's `train.log`, or for a resumed training the log of every part so far (the part it resumes first,
    itself whole when that part was resumed too), so the MLflow artifact `train.log` is never only the last part."""
    log_file = log_path(run_dir)
    if resume is None or resume.parent.name != "checkpoints" or not log_file.is_file():
        return log_file
    before = resume.parent.parent
    previous = before / WHOLE_LOG if (before / WHOLE_LOG).is_file() else log_path(before)
    if before == run_dir or not previous.is_file():
        return log_file
    whole = run_dir / WHOLE_LOG
    whole.parent.mkdir(parents=True, exist_ok=True)
    with whole.open("wb") as out:
        out.write(previous.read_bytes())
        out.write(f"---- resumed from {resume} in {run_dir} ----\n".encode())
        out.write(log_file.read_bytes())
    return whole


def _log_outputs(tracker, ctx: RunContext, trainer: Trainer, resume: Path | None = None) -> None:
    """Curves and log as artifacts (the checkpoints went in as they were saved): also after a failure, so a broken
    run can be inspected."""
    if not ctx.group.is_main:
        return
    if trainer.history:
        tracker.log_artifact(plot_curves(trainer.history, ctx.run_dir / "curves.png"))
    log_file = whole_log(ctx.run_dir, resume)
    if log_file.is_file():
        tracker.log_artifact(log_file)
