"""What every task needs before it starts: the run dir, logging to a file in it, seeds, the built components."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conformer.hardware import ProcessGroup

LOG_FILE = "train.log"


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
