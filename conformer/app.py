"""The application behind run.py: validate, set up the hardware, run the selected task."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from conformer.hardware import configure_device
from conformer.runtime import RunContext, log_to_file, resolved_yaml, seed_everything
from conformer.validation import validate_config

log = logging.getLogger(__name__)
PROJECT_ROOT_ENV = "CONFORMER_PROJECT_ROOT"


def task_registry() -> dict[str, Callable[[RunContext], float | None]]:
    from conformer.tasks.train import train

    return {"train": train}


def project_root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.root or os.environ.get(PROJECT_ROOT_ENV) or Path.cwd()).resolve()


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Run `cfg.task` in `run_dir`; returns the task's objective (the monitored metric for training)."""
    validate_config(cfg)
    tasks = task_registry()
    if cfg.task not in tasks:
        raise NotImplementedError(f"task={cfg.task} is not available yet; available: {', '.join(tasks)}")
    group = configure_device(cfg.hardware)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_to_file(run_dir, group.rank)
    if group.is_main:
        log.info("composed config:\n%s", resolved_yaml(cfg))
    seed_everything(int(cfg.seed))
    return tasks[cfg.task](RunContext(cfg=cfg, run_dir=run_dir, project_root=project_root(cfg), group=group))
