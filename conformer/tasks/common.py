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

from conformer.config.validation import model_config_arguments
from conformer.models import weights
from conformer.models.checkpoint_file import read_checkpoint_meta
from conformer.models.registry import is_conformer, model_name
from conformer.runtime.compile_cache import use_compile_cache
from conformer.runtime.hardware import ProcessGroup
from conformer.runtime.paths import git_commit
from conformer.tracking import (
    NullTracker,
    Tracker,
    comparable_params,
    create_tracker,
    default_run_name,
    flatten_config,
    image_dataset,
    local_weights,
    run_tags,
    user_tags,
)
from conformer.vocabulary import CHECKPOINT_SUFFIXES, MLFLOW_PREFIX

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


def build_network(cfg: DictConfig, num_classes: int, pretrained: Path | None = None) -> nn.Cell:
    """The configured network (`instantiate(cfg.model)`) with `num_classes` outputs (the data's, or the weights'),
    and for a Conformer the weights of `pretrained`, a file the task resolved from `model.pretrained` (an
    `mlflow:` spec needs the tracking store). Its graphs come from the compile cache when this config ran before."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if is_conformer(model):
        model["pretrained"] = str(pretrained) if pretrained else None
    network = instantiate(model, num_classes=num_classes)
    use_compile_cache(cfg, network)  # its key includes the network's shapes, known now
    return network


def resolve_weights(ctx: RunContext, spec: str, checkpoint: str = "best.ckpt") -> Path:
    return local_weights(spec, ctx.cfg.tracking, ctx.project_root, checkpoint)


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
    """The task's MLflow tracker (a no-op off rank 0), its run named by `default_run_name` (`tracking.run_name`,
    a sweep trial's overrides, or task-model-data)."""
    name = default_run_name(ctx.cfg, ctx.run_dir)
    return create_tracker(ctx.cfg.tracking, ctx.project_root, is_main=ctx.group.is_main, default_run_name=name)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra saved for this run (empty outside the CLI)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def run_params(cfg: DictConfig, world_size: int = 1) -> dict[str, str]:
    """What runs are compared by (`comparable_params`) plus every constructor argument of the network (the
    variant's defaults included)."""
    architecture = {f"model.{key}": value for key, value in model_config_arguments(cfg.model).items()}
    return {**flatten_config(architecture), **comparable_params(cfg, world_size)}


TRAINED_BY_TAG = "trained_by_run_id"  # on eval/export/predict runs: the training run of their weights


def weights_origin(spec: str, path: Path) -> tuple[str | None, dict[str, str] | None]:
    """(the training run that wrote the weights, the params it logged) from the checkpoint's meta (or an
    `mlflow:<run_id>` spec); None for what they do not say (official weights, checkpoints of older versions)."""
    meta = read_checkpoint_meta(path) if path.suffix in CHECKPOINT_SUFFIXES else {}
    run_id = meta.get("mlflow_run_id")
    if not run_id and str(spec).startswith(MLFLOW_PREFIX):
        run_id = str(spec)[len(MLFLOW_PREFIX):]
    return run_id or None, meta.get("params")


def open_run(tracker: Tracker | NullTracker, ctx: RunContext, extra_tags: Mapping[str, Any] | None = None,
             resume_run_id: str | None = None, weights: Path | None = None) -> None:
    """Start the task's MLflow run (or continue `resume_run_id`): the comparable config and architecture as
    params, the standard and the user's tags (`tags=`), the config as artifacts.

    A run on trained `weights` (`task.checkpoint`) is tagged with them and with the training run that wrote them
    (`trained_by_run_id`), and records that training's params (this config's when the checkpoint has none).
    """
    cfg = ctx.cfg
    overrides = run_overrides(ctx.run_dir)
    params, tags = run_params(cfg, ctx.group.world_size), dict(extra_tags or {})
    if weights is not None:
        trained_by, trained_params = weights_origin(cfg.task.checkpoint, weights)
        tags.update({"weights": weights, **({TRAINED_BY_TAG: trained_by} if trained_by else {})})
        if trained_params:
            task = {key: value for key, value in flatten_config({"task": cfg.task}).items() if key != "task.name"}
            params = {**trained_params, **task}
    tracker.start(resume_run_id=resume_run_id, params=params, tags=run_tags(
        model=model_name(cfg.model), data=cfg.data.name, hardware=cfg.hardware.name, task=cfg.task.name,
        overrides=overrides, git_commit=git_commit(ctx.project_root), run_dir=ctx.run_dir,
        world_size=ctx.group.world_size, extra={**user_tags(cfg.get("tags")), **tags}))
    if tags.get(TRAINED_BY_TAG):  # the run's description: a link to the training, on the run's page
        tracker.link_training(tags[TRAINED_BY_TAG])
    tracker.log_text(resolved_yaml(cfg), "config.yaml")
    tracker.log_text("\n".join(overrides) + "\n", "overrides.txt")


def log_datasets(tracker: Tracker | NullTracker, cfg: DictConfig, data: Any, splits: Mapping[str, int]) -> None:
    """Record the data as the run's dataset inputs, one per split (context -> number of images)."""
    root = OmegaConf.select(cfg, "data.source.root", default=None) or f"{cfg.data.name} (generated)"
    for context, images in splits.items():
        tracker.log_inputs([image_dataset(cfg.data.name, root, context, images, data.num_classes, data.image_size)],
                           context)
