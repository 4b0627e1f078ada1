"""Training's checkpoints: `last.ckpt` always, `best.ckpt` on improvement, and with `keep_top_k` > 1 the k best
epochs as `epoch<N>-<monitor>-<value>.ckpt` (the best of them a hard link to `best.ckpt`); a resume reads them back.
The file format is `conformer.models.checkpoint_file`'s. The epoch always comes from the file, never from its name."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindspore import Tensor, nn

from conformer.models.checkpoint_file import (
    EMA_PREFIX,
    OBSOLETE_OPTIMIZER_STATE,
    OPTIMIZER_PREFIX,
    STEP_PREFIX,
    StateSource,
    assign_tensors,
    copy_checkpoint,
    link_checkpoint,
    load_network_tensors,
    network_params,
    read_checkpoint,
    read_checkpoint_meta,
    remove_file,
    save_checkpoint,
    state_params,
    strip_prefix,
    with_prefix,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- manager
def _training_tensors(network: nn.Cell, optimizer: StateSource | None, ema: StateSource | None,
                      step_state: StateSource | None) -> dict[str, Tensor]:
    """Everything a checkpoint holds: the network's parameters, then the optimizer, EMA and train step state."""
    net_params = network_params(network)
    own = {id(p) for p in net_params.values()}
    tensors: dict[str, Tensor] = dict(net_params)
    for source, prefix in ((optimizer, OPTIMIZER_PREFIX), (ema, EMA_PREFIX), (step_state, STEP_PREFIX)):
        if source is not None:
            tensors.update(with_prefix(prefix, state_params(source, own)))
    return tensors


@dataclass
class TrainState:
    """Where training stands, as stored in a checkpoint."""

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0  # batches of epoch `epoch` already trained: non-zero in a mid-epoch checkpoint
    best_metric: float | None = None
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None  # the run that wrote the checkpoint: a resume continues it


class CheckpointManager:
    """Writes `last.ckpt` each save and `best.ckpt` when `monitor` improves (`mode` "max" or "min"); with
    `keep_top_k` > 1 also keeps the k best epochs (timm's CheckpointSaver): `epoch<N>-<monitor>-<value>.ckpt`,
    the worst removed when a better one comes."""

    def __init__(self, directory: Path | str, monitor: str = "val/top1_sum", mode: str = "max",
                 keep_top_k: int = 1) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"checkpoint mode must be 'max' or 'min', got {mode!r}")
        if int(keep_top_k) < 1:
            raise ValueError(f"keep_top_k must be at least 1 (best.ckpt), got {keep_top_k}")
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = mode
        self.keep_top_k = int(keep_top_k)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.ranked: list[tuple[float, int, Path]] = self._ranked_on_disk()  # best first
        self.dropped: list[Path] = []  # the ranked files the last save removed

    def ranked_path(self, epoch: int, value: float) -> Path:
        return self.directory / f"epoch{int(epoch):03d}-{self.monitor.replace('/', '_')}-{value:.4f}.ckpt"

    def _ranked_on_disk(self) -> list[tuple[float, int, Path]]:
        """The ranked files a run dir already holds (a training continued in the same dir)."""
        if self.keep_top_k == 1 or not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"epoch*-{self.monitor.replace('/', '_')}-*.ckpt"):
            meta = read_checkpoint_meta(path)
            if meta.get("monitor") == self.monitor and self.monitor in meta.get("metrics", {}):
                found.append((float(meta["metrics"][self.monitor]), int(meta["epoch"]), path))
        return self._sorted(found)

    def _sorted(self, ranked: list[tuple[float, int, Path]]) -> list[tuple[float, int, Path]]:
        return sorted(ranked, key=lambda item: (-item[0] if self.mode == "max" else item[0], item[1]))

    def _keep_ranked(self, value: float, epoch: int, best: Path | None, tensors: Mapping[str, Tensor],
                     extra: Mapping[str, Any]) -> Path | None:
        """Add this epoch to the k best when it belongs there (a link to `best`, written now, else a new file);
        remove the one it pushes out. Returns its path, None when it is not among the k best."""
        if self.keep_top_k == 1 or not math.isfinite(value):
            return None
        if len(self.ranked) >= self.keep_top_k:
            worst = self.ranked[-1][0]
            if not (value > worst if self.mode == "max" else value < worst):
                return None
        path = self.ranked_path(epoch, value)
        if best is not None:
            link_checkpoint(best, path)
        else:
            save_checkpoint(tensors, path, extra)
        self.ranked = self._sorted([*(r for r in self.ranked if r[2] != path), (value, int(epoch), path)])
        for _, _, dropped in self.ranked[self.keep_top_k:]:
            remove_file(dropped)
            self.dropped.append(dropped)
        del self.ranked[self.keep_top_k:]
        return path

    @property
    def last_path(self) -> Path:
        return self.directory / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.ckpt"

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.mode == "max" else value < self.best_metric

    def save(self, network: nn.Cell, optimizer: StateSource | None = None, ema: StateSource | None = None, *,
             epoch: int, step: int, metrics: Mapping[str, float], step_state: StateSource | None = None,
             meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Save after `epoch` (epochs done) and global `step`; `step_state` is the train step's own state (loss
        scale), `meta` more JSON values for the file (e.g. the MLflow run id, the config fingerprint).

        Returns {"last": path}, plus "best" when the monitored metric improved and "ranked" when the epoch is
        among the `keep_top_k` best.
        """
        if self.monitor not in metrics:
            raise KeyError(f"monitored metric {self.monitor!r} is not among the metrics {sorted(metrics)}: "
                           "set the checkpoint monitor to one of them")
        value = float(metrics[self.monitor])
        improved = self.is_improvement(value)
        self.dropped = []
        best_metric, best_epoch = (value, int(epoch)) if improved else (self.best_metric, self.best_epoch)
        tensors = _training_tensors(network, optimizer, ema, step_state)
        extra = {**(meta or {}), "epoch": int(epoch), "step": int(step), "best_metric": best_metric,
                 "best_epoch": best_epoch, "monitor": self.monitor, "mode": self.mode,
                 "metrics": {k: float(v) for k, v in metrics.items()}}
        if not improved:
            paths = {"last": save_checkpoint(tensors, self.last_path, extra)}
        else:
            # best first: a crash in between leaves a `last` whose best metric is not ahead of best.ckpt
            paths = {"best": save_checkpoint(tensors, self.best_path, extra)}
            paths["last"] = copy_checkpoint(self.best_path, self.last_path, int(step))
            self.best_metric, self.best_epoch = best_metric, best_epoch
        ranked = self._keep_ranked(value, epoch, paths.get("best"), tensors, extra)
        return {**paths, "ranked": ranked} if ranked is not None else paths

    def save_last(self, network: nn.Cell, optimizer: StateSource | None = None, ema: StateSource | None = None, *,
                  epoch: int, epoch_step: int, step: int, step_state: StateSource | None = None,
                  meta: Mapping[str, Any] | None = None) -> Path:
        """A mid-epoch `last.ckpt`: `epoch_step` batches into epoch `epoch` (0-based epochs done), global `step`;
        the best metric so far rides along, nothing is ranked."""
        extra = {**(meta or {}), "epoch": int(epoch), "epoch_step": int(epoch_step), "step": int(step),
                 "best_metric": self.best_metric, "best_epoch": self.best_epoch, "monitor": self.monitor,
                 "mode": self.mode, "metrics": {}}
        return save_checkpoint(_training_tensors(network, optimizer, ema, step_state), self.last_path, extra)

    def load(self, path: Path | str, network: nn.Cell, optimizer: StateSource | None = None,
             ema: StateSource | None = None, strict: bool = True,
             step_state: StateSource | None = None) -> TrainState:
        """Restore network (+ optimizer, EMA, train step state when given) and this manager's best metric; returns
        the state."""
        tensors, extra = read_checkpoint(path)
        load_network_tensors(tensors, network, path, strict)
        own = {id(p) for p in network_params(network).values()}
        groups = ((optimizer, OPTIMIZER_PREFIX, "optimizer state"), (ema, EMA_PREFIX, "EMA weights"),
                  (step_state, STEP_PREFIX, "train step state"))
        for source, prefix, what in groups:
            if source is not None:
                values, targets = strip_prefix(prefix, tensors), state_params(source, own)
                if prefix == OPTIMIZER_PREFIX:
                    values = {name: value for name, value in values.items()
                              if name in targets or not name.startswith(OBSOLETE_OPTIMIZER_STATE)}
                assign_tensors(targets, values, f"{what} from {path}", strict)
        state = TrainState(epoch=int(extra.get("epoch", 0)), step=int(extra.get("step", 0)),
                           epoch_step=int(extra.get("epoch_step", 0)),
                           best_metric=extra.get("best_metric"), best_epoch=extra.get("best_epoch"),
                           metrics=dict(extra.get("metrics", {})), mlflow_run_id=extra.get("mlflow_run_id"))
        if extra.get("monitor", self.monitor) == self.monitor and extra.get("mode", self.mode) == self.mode:
            self.best_metric, self.best_epoch = state.best_metric, state.best_epoch
        else:
            log.warning("checkpoint %s tracked %s (%s), this run monitors %s (%s): best metric starts afresh",
                        path, extra.get("monitor"), extra.get("mode"), self.monitor, self.mode)
        return state
