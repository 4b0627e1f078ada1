"""What every task needs before it starts: the run dir, logging to a file in it, seeds, the built components."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conformer.hardware import ProcessGroup
from conformer.validation import ConfigError

log = logging.getLogger(__name__)
LOG_FILE = "train.log"
CHECKPOINT_SUFFIXES = (".ckpt",)
OFFICIAL_SUFFIXES = (".pth", ".pt", ".tar", ".npz")  # converted on load (conformer.convert)


@dataclass(frozen=True)
class RunContext:
    """Where a task runs: its config, its run dir, the project root and its place in the process group."""

    cfg: DictConfig
    run_dir: Path
    project_root: Path
    group: ProcessGroup


def log_to_file(run_dir: Path, rank: int = 0) -> Path:
    """Send this package's log records to `<run_dir>/train.log` (rank 0) or `worker_<rank>.log`."""
    path = run_dir / (LOG_FILE if rank == 0 else f"worker_{rank}.log")
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return path


@contextmanager
def file_logging(run_dir: Path, rank: int = 0) -> Iterator[Path]:
    """`log_to_file` for one run: a handler it adds is closed afterwards, so runs in one process (tests, sweeps
    with the basic launcher) do not write into each other's logs."""
    before = set(logging.getLogger().handlers)
    path = log_to_file(run_dir, rank)
    try:
        yield path
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


class _Interrupt:
    pending = False


def _remember_sigint(signum: int, frame: Any) -> None:
    _Interrupt.pending = True
    raise KeyboardInterrupt


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, for `check_interrupted`.

    Python drops an exception raised inside a finalizer or weakref callback ("Exception ignored in ..."): a
    Ctrl-C landing there (e.g. while SQLAlchemy collects garbage as the MLflow run opens) would be lost and the
    run would train to the end.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (background job) or custom
        yield
        return
    previous = signal.signal(signal.SIGINT, _remember_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _Interrupt.pending = False


def check_interrupted() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C arrived but its exception got swallowed on the way."""
    if _Interrupt.pending:
        raise KeyboardInterrupt("Ctrl-C")


def seed_everything(seed: int) -> None:
    """MindSpore's global seed also seeds the dataset pipeline (bit-identical with one worker)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


def build_data(cfg: DictConfig) -> Any:
    return instantiate(cfg.data, _convert_="all")


def build_network(cfg: DictConfig, num_classes: int) -> Any:
    """The model config with the class count the data actually has (for `data=folder`, inferred)."""
    return instantiate(cfg.model, num_classes=num_classes, _convert_="all")


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def task_weights(cfg: DictConfig) -> Path:
    """The weights a task that does not train uses: `task.checkpoint`, else `model.pretrained`.

    Checked before anything is built: a missing or unknown file, or `task.ema=true` without one of our
    checkpoints, is a ConfigError.
    """
    key = "task.checkpoint" if cfg.task.get("checkpoint") else "model.pretrained"
    source = OmegaConf.select(cfg, key)
    if not source:
        raise ConfigError(f"task={cfg.task.name} needs weights: set task.checkpoint=<run dir>/checkpoints/best.ckpt "
                          "(ours) or official weights (.pth/.npz), or model.pretrained=<file>")
    path = Path(str(source)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={source}: no such file")
    if path.suffix not in CHECKPOINT_SUFFIXES + OFFICIAL_SUFFIXES:
        raise ConfigError(f"{key}={source}: unknown weights format {path.suffix!r}; use one of our .ckpt files or "
                          f"official weights ({', '.join(OFFICIAL_SUFFIXES)})")
    if cfg.task.get("ema") and path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"task.ema=true needs a .ckpt written by training with trainer.ema_decay set; {path.name} "
                          "holds no EMA copy: drop task.ema")
    return path.resolve()


def weights_num_classes(path: Path) -> int:
    """Class count of a weights file, read from its conv classifier head."""
    from conformer.convert import infer_num_classes, read_state_dict

    if path.suffix not in CHECKPOINT_SUFFIXES:
        return infer_num_classes(read_state_dict(path))
    head = ms.load_checkpoint(str(path), choice_func=lambda name: name == "conv_cls_head.bias")
    if not head:
        raise ConfigError(f"{path} has no conv_cls_head.bias: is it a Conformer checkpoint?")
    return int(head["conv_cls_head.bias"].shape[0])


def build_trained_network(cfg: DictConfig, weights: Path, num_classes: int) -> Any:
    """The configured model with `weights` loaded (the EMA copy when `task.ema`), in eval mode."""
    from conformer.models import load_pretrained
    from conformer.train.checkpoint import load_weights

    network = instantiate(cfg.model, num_classes=num_classes, pretrained=None, _convert_="all")
    if cfg.task.get("ema"):
        load_weights(weights, network, strict=True, ema=True)
    else:
        load_pretrained(network, str(weights))
    network.set_train(False)
    log.info("%s with the %sweights of %s", cfg.model.name, "EMA " if cfg.task.get("ema") else "", weights)
    return network


def task_tracker(ctx: RunContext) -> Any:
    """The task's MLflow tracker (a no-op off rank 0); its run is named `<task>-<model>-<run dir>` unless
    `tracking.run_name` says otherwise (sweep trials get distinct names: their run dirs are the job numbers)."""
    from conformer.tracking import create_tracker

    name = f"{ctx.cfg.task.name}-{ctx.cfg.model.name}-{ctx.run_dir.name}"
    return create_tracker(ctx.cfg.tracking, ctx.project_root, is_main=ctx.group.is_main, default_run_name=name)


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra saved for this run (empty outside the CLI)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def open_run(tracker: Any, ctx: RunContext, task: str, extra_tags: Mapping[str, Any] | None = None) -> None:
    """Start the task's MLflow run: the flattened config as params, the standard tags, the config as artifacts."""
    from conformer.tracking import flatten_config, git_commit, run_tags

    cfg = ctx.cfg
    overrides = run_overrides(ctx.run_dir)
    tracker.start(params=flatten_config(cfg), tags=run_tags(
        model=cfg.model.name, data=cfg.data.name, hardware=cfg.hardware.name, task=task, overrides=overrides,
        git_commit=git_commit(ctx.project_root), run_dir=ctx.run_dir, world_size=ctx.group.world_size,
        extra=extra_tags))
    tracker.log_text(resolved_yaml(cfg), "config.yaml")
    tracker.log_text("\n".join(overrides) + "\n", "overrides.txt")
