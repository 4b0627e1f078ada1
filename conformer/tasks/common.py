"""What every task shares: its context, seeds, the built components, trained networks and its MLflow run."""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from mindspore import nn
from omegaconf import DictConfig, OmegaConf

from conformer import weights
from conformer.hardware import ProcessGroup
from conformer.paths import git_commit
from conformer.tracking import NullTracker, Tracker, create_tracker, default_run_name, flatten_config, run_tags
from conformer.validation import model_config_arguments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Where a task runs: its config, its run dir, the project root and its place in the process group."""

    cfg: DictConfig
    run_dir: Path
    project_root: Path
    group: ProcessGroup


def seed_everything(seed: int) -> None:
    """MindSpore's global seed also seeds the dataset pipeline (bit-identical with one worker)."""
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


def build_data(cfg: DictConfig) -> Any:
    return instantiate(cfg.data, _convert_="all")


def build_network(cfg: DictConfig, num_classes: int) -> nn.Cell:
    """The configured network with `num_classes` outputs (the data's, or the weights'); no weights loaded."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("pretrained", "pretrained_strict"):  # weights are the task's business (conformer.weights)
        model.pop(key, None)
    return instantiate(model, num_classes=num_classes)


def resolve_weights(ctx: RunContext, spec: str, checkpoint: str = "best.ckpt") -> Path:
    return weights.resolve(spec, ctx.cfg.tracking, ctx.project_root, checkpoint)


def trained_network(ctx: RunContext, num_classes: int | None = None) -> tuple[nn.Cell, Path]:
    """The network with the weights of `task.checkpoint` (its EMA copy when `task.ema`), in eval mode.

    The class count comes from the weights unless `num_classes` says otherwise.
    """
    path = resolve_weights(ctx, ctx.cfg.task.checkpoint)
    network = build_network(ctx.cfg, num_classes or weights.num_classes(path))
    weights.load_into(network, path, ema=bool(ctx.cfg.task.get("ema")))
    network.set_train(False)
    return network, path


def task_tracker(ctx: RunContext) -> Tracker | NullTracker:
    """The task's MLflow tracker (a no-op off rank 0), its run named by `default_run_name` unless
    `tracking.run_name` says otherwise."""
    name = default_run_name(ctx.cfg.task.name, ctx.cfg.model.name, ctx.run_dir)
    return create_tracker(ctx.cfg.tracking, ctx.project_root, is_main=ctx.group.is_main, default_run_name=name)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra saved for this run (empty outside the CLI)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def run_params(cfg: DictConfig) -> dict[str, str]:
    """The flattened config plus every constructor argument of the network (the variant's defaults included)."""
    architecture = {f"model.{key}": value for key, value in model_config_arguments(cfg.model).items()}
    return {**flatten_config(architecture), **flatten_config(cfg)}


def open_run(tracker: Tracker | NullTracker, ctx: RunContext, extra_tags: Mapping[str, Any] | None = None,
             resume_run_id: str | None = None) -> None:
    """Start the task's MLflow run (or continue `resume_run_id`): config and architecture as params, the standard
    tags, the config as artifacts."""
    cfg = ctx.cfg
    overrides = run_overrides(ctx.run_dir)
    tracker.start(resume_run_id=resume_run_id, params=run_params(cfg), tags=run_tags(
        model=cfg.model.name, data=cfg.data.name, hardware=cfg.hardware.name, task=cfg.task.name,
        overrides=overrides, git_commit=git_commit(ctx.project_root), run_dir=ctx.run_dir,
        world_size=ctx.group.world_size, extra=extra_tags))
    tracker.log_text(resolved_yaml(cfg), "config.yaml")
    tracker.log_text("\n".join(overrides) + "\n", "overrides.txt")
