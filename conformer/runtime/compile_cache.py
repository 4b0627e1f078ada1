"""MindSpore's compile cache, keyed so that a graph loaded from it is the graph this run would compile.

MindSpore itself only notices changes to the files the entry script imports at its top level. Here the cache folder
is keyed by a hash of the package's sources and those of every other module a `_target_` names (a user's own
component), the MindSpore version, the config (less the keys that never reach a graph) and the network's parameter
shapes. A run writes into a folder of its own and moves it into place only when
its task finished, so a killed run never leaves a half-written cache for the next one to load.

MindSpore reads the cache folder once per process and numbers the graphs in the order they compile, so the cache
serves only a process that runs one training from start to end: `python run.py` with task=train, in one process or
in each msrun worker (`allow`; a folder per rank, as each rank's graphs hold its own communication ops). Sweeps that
run trials in one process, eval, export and predict compile as before.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conformer.runtime.paths import PACKAGE_DIR

log = logging.getLogger(__name__)

PACKAGE = PACKAGE_DIR  # its sources key the cache
# Config keys that change no graph: bookkeeping, logging, paths, the lr values (Parameters the step reads), the
# length of the training. Everything else is part of the key, log_every_n_steps too (the step's window of records,
# lrs and masks has its length).
IGNORED = {
    "": ("tracking", "tags", "compile_cache", "paths"),
    "data.source": ("root",),  # where the images are; the class count is in the network's shapes
    "trainer": ("resume", "save_every_n_steps", "epochs", "progress_bar", "keep_top_k",
                "monitor", "monitor_mode", "limit_train_batches", "limit_val_batches"),
    "optim": ("schedule",),
    "task": ("free_space_margin_mb",),
}
KEEP = 16  # cached configs kept; beyond them the least recently used go, once unused for EVICT_AFTER_S
EVICT_AFTER_S = 3600
BUILDING = ".building-"
_allowed = False  # set by `allow` for the one task of this process
_rank: int | None = None  # this msrun worker's rank (its own folder), None in a single process
_building: Path | None = None  # this process's folder under construction, moved into place by `finish`


def allow(rank: int | None = None) -> None:
    """This process runs one training and nothing else compiles before it: the cache may serve it. `rank`: this
    process is that rank of a data-parallel job."""
    global _allowed, _rank
    _allowed, _rank = True, rank


def cache_key(cfg: DictConfig, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What the graphs of this run depend on, as 16 hex digits."""
    import mindspore

    plain = OmegaConf.to_container(cfg, resolve=True)
    for section, keys in IGNORED.items():
        node = plain
        for part in filter(None, section.split(".")):
            node = node.get(part) if isinstance(node, dict) else None
        for key in keys if isinstance(node, dict) else ():
            node.pop(key, None)
    digest = hashlib.sha256(mindspore.__version__.encode())
    package = {*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.cc"), *PACKAGE.rglob("*.h")}  # the kernels a graph calls
    sources = package | {path for target in _targets(plain) if (path := _source_of(target))}
    for path in sorted(sources):
        digest.update(str(path).encode() + path.read_bytes())
    digest.update(json.dumps([plain, sorted(shapes.items())], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _targets(node: Any) -> list[str]:
    """Every `_target_` in a plain config tree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


def _source_of(target: str) -> Path | None:
    """The file of the module that defines `target` (a user's own component counts like the package's)."""
    parts = target.split(".")
    for end in range(len(parts) - 1, 0, -1):  # a.b.Class or a.b.Class.method: the longest importable module
        try:
            spec = importlib.util.find_spec(".".join(parts[:end]))
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin).resolve()
    return None


def use_compile_cache(cfg: DictConfig, network: Any) -> Path | None:
    """Point MindSpore's compile cache at this config's folder (load it when complete, else build one); the folder
    used, or None when the cache is off (`compile_cache=false`) or not allowed in this process (see `allow`)."""
    global _allowed, _building
    if not (_allowed and cfg.get("compile_cache", False)):
        return None
    _allowed = False  # once per process: MindSpore reads the folder once
    root = Path(cfg.paths.compile_cache_dir)
    shapes = {param.name: tuple(param.shape) for param in network.get_parameters()}
    final = root / (cache_key(cfg, shapes) + ("" if _rank is None else f"-rank{_rank}"))
    _remove_abandoned(root)
    if final.is_dir():
        os.utime(final)  # recently used: kept by the eviction
        folder, _building = final, None
        log.info("compile cache: loading graphs from %s", final)
    else:
        folder = _building = root / f"{final.name}{BUILDING}{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(folder)
    return folder


def finish() -> None:
    """The task finished: move the folder this process built into place (unless another run got there first)."""
    global _building
    building, _building = _building, None
    os.environ.pop("MS_COMPILER_CACHE_ENABLE", None)
    if building is None or not building.is_dir():
        return
    final = building.with_name(building.name.split(BUILDING)[0])
    try:
        building.rename(final)
    except OSError:  # a concurrent run of the same config finished first: keep its folder
        shutil.rmtree(building, ignore_errors=True)
        return
    _evict(final.parent)


def _remove_abandoned(root: Path) -> None:
    """Folders of runs that died while building their cache."""
    for folder in root.glob(f"*{BUILDING}*") if root.is_dir() else ():
        pid = int(folder.name.rsplit("-", 1)[-1]) if folder.name.rsplit("-", 1)[-1].isdigit() else 0
        if not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _evict(root: Path) -> None:
    complete = sorted((f for f in root.iterdir() if f.is_dir() and BUILDING not in f.name),
                      key=lambda f: f.stat().st_mtime, reverse=True)
    for folder in complete[KEEP:]:
        if time.time() - folder.stat().st_mtime > EVICT_AFTER_S:  # not one a running process may be reading
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

