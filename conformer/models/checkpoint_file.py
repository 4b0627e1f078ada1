"""The `.ckpt` file: written atomically, read back, and a network's weights loaded from it.

One file holds the network weights under their own names (loadable by plain `ms.load_checkpoint`), optimizer
state under "optimizer." and EMA weights under "ema.", the train step's state under "train_step.", and the run
state in `meta.*` entries. MindSpore stores Python floats as float32, so the exact values live in the JSON string
`meta.json`; the scalar `meta.<key>` entries are readable copies for other tools. Training's own bookkeeping
(which files to keep, resuming) is `conformer.train.checkpoint`'s.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Union

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from conformer.errors import DISK_FULL_ERRNOS, CheckpointError

log = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer."
# experimental AdamW's AMSGrad buffer, saved by checkpoints before FusedAdamW (always zero without amsgrad)
OBSOLETE_OPTIMIZER_STATE = "max_exp_avg_sq."
EMA_PREFIX = "ema."
STEP_PREFIX = "train_step."  # the train step's own state: the loss scale and its counter
META_PREFIX = "meta."
META_JSON = META_PREFIX + "json"
DISK_FULL_BYTES = 64 * 2**20  # a failed save with less free space than this was a full disk


class HasParameters(Protocol):
    """Anything with named parameters: a Cell, or `conformer.train.ema.ModelEma`."""

    def parameters_dict(self) -> Mapping[str, Parameter]: ...


StateSource = Union[HasParameters, Mapping[str, Parameter], Iterable[Parameter]]


# ---------------------------------------------------------------------------------------------------- files
def _entries(params: nn.Cell | list[dict[str, Any]] | Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """`params` as MindSpore's list form [{"name", "data"}]."""
    if isinstance(params, nn.Cell):
        params.init_parameters_data()
        return [{"name": name, "data": p} for name, p in params.parameters_dict().items()]
    if isinstance(params, Mapping):
        return [{"name": str(name), "data": _tensor(value)} for name, value in params.items()]
    if isinstance(params, list):
        return [{"name": str(e["name"]), "data": _tensor(e["data"])} for e in params]
    raise TypeError(f"save_checkpoint: params must be a Cell, a list of {{'name', 'data'}} dicts or a dict "
                    f"name -> Tensor, got {type(params).__name__}")


def _tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else Tensor(value)


def _meta_entries(extra: Mapping[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(dict(extra), allow_nan=True)
    except TypeError as err:
        raise TypeError(f"checkpoint extra values must be JSON-serialisable: {err}") from err
    scalars = {f"{META_PREFIX}{k}": v for k, v in extra.items() if isinstance(v, (bool, int, float, str))}
    return {**scalars, META_JSON: encoded}


def remove_file(path: Path) -> None:
    """Unlink `path` (a read-only file too: unlinking needs only the folder's permission); a link is removed, never
    followed."""
    path.unlink(missing_ok=True)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path, step: Any = None) -> Path:
    """The temp file of `path` while it is written, named after the global step it holds (`.last.12.partial.ckpt`)
    where there is one: a leftover says which save was cut short. No random part: a run dir has one writer
    (conformer.runtime.runlock), which writes its files one at a time."""
    return path.with_name(f".{path.stem}{'' if step is None else f'.{step}'}.partial.ckpt")


def _remove_stale_partials(path: Path) -> None:
    """Temp files of earlier writes of `path` that a killed process left behind (ours and MindSpore's `.tmp`)."""
    for stale in path.parent.glob(f".{path.stem}.*partial*"):
        remove_file(stale)


def _no_space(path: Path, code: int = errno.ENOSPC) -> OSError:
    """A full disk (or quota) while writing `path`, said as the OSError of `path` (not of a temp or source file)."""
    return OSError(code, os.strerror(code), str(path))


def _publish(tmp: Path, path: Path) -> None:
    """fsync `tmp`, then atomically move it to `path` and make the rename durable."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def save_checkpoint(params: nn.Cell | list[dict[str, Any]] | Mapping[str, Tensor], path: Path | str,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write `params` and `extra` to `path` atomically: a temp file in the same directory, fsync, os.replace.

    A failed save leaves any previous file at `path` untouched and no temp file behind.
    """
    path = Path(path)
    if path.suffix != ".ckpt":
        raise ValueError(f"checkpoint path must end with .ckpt (MindSpore appends it otherwise): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    # MindSpore writes "<stem>.tmp" next to the name it is given, then renames it: both are ours to clean.
    tmp = _temp_name(path, (extra or {}).get("step"))
    try:
        try:
            ms.save_checkpoint(_entries(params), str(tmp), append_dict=_meta_entries(extra or {}))
        except (RuntimeError, ValueError) as err:  # MindSpore's words for a full disk: said as the OSError it is
            if "space" in str(err).lower() or shutil.disk_usage(path.parent).free < DISK_FULL_BYTES:
                raise _no_space(path) from err
            raise
        try:
            _publish(tmp, path)
        except OSError as err:  # fsync: a file system that allocates late reports a full disk here
            if err.errno not in DISK_FULL_ERRNOS:
                raise
            raise _no_space(path, err.errno) from err
    finally:
        remove_file(tmp)
        remove_file(tmp.with_suffix(".tmp"))
    return path


def copy_checkpoint(source: Path, path: Path, step: int | None = None) -> Path:
    """Atomic copy (cheaper than serialising the tensors again) of the checkpoint of global `step`. It writes its temp
    file as it finds it, as `cp` does: a leftover is overwritten, a link there (a test's /dev/full) written through;
    the next save by MindSpore of `path` removes the leftovers."""
    tmp = _temp_name(path, step)
    try:
        try:
            shutil.copyfile(source, tmp)
            _publish(tmp, path)
        except OSError as err:
            if err.errno not in DISK_FULL_ERRNOS:
                raise
            raise _no_space(path, err.errno) from err
    finally:
        remove_file(tmp)
    return path


def link_checkpoint(source: Path, path: Path) -> Path:
    """Atomic hard link (a copy where the file system has none): the files share their bytes on disk. Safe because
    checkpoints are only ever replaced (a new file renamed over), never written in place."""
    _remove_stale_partials(path)
    tmp = _temp_name(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        _publish(tmp, path)
    finally:
        remove_file(tmp)
    return path


_NOTHING_SELECTED = "parameter dict is empty after filter"  # MindSpore's words for "no entry was chosen"


def load_raw(path: Path | str, choice_func: Any = None) -> dict[str, Any]:
    """`ms.load_checkpoint` that says what is wrong with a bad file in one line (`CheckpointError`); a file none of
    whose entries `choice_func` picks is an empty dict, not MindSpore's misleading `filter_prefix` message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes; a write cut short?)")
    try:
        return ms.load_checkpoint(str(path), choice_func=choice_func)
    except (ValueError, RuntimeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _NOTHING_SELECTED in reason:
            if choice_func is not None:
                return {}
            reason = "it holds no tensors"
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from err


def read_checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The extra dict of a checkpoint, without reading its tensors."""
    raw = load_raw(path, choice_func=lambda name: name == META_JSON)
    meta = raw.get(META_JSON)
    try:
        return json.loads(meta) if isinstance(meta, str) else {}
    except ValueError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: its {META_JSON} is not JSON ({err})") from err


def read_checkpoint(path: Path | str) -> tuple[dict[str, Parameter], dict[str, Any]]:
    """(tensors by name without `meta.*` entries, extra dict) of a checkpoint file."""
    raw = load_raw(path)
    meta = raw.get(META_JSON)
    extra = json.loads(meta) if isinstance(meta, str) else {}
    tensors = {k: v for k, v in raw.items() if not k.startswith(META_PREFIX)}
    return tensors, extra


# ---------------------------------------------------------------------------------------------------- state
def state_params(source: StateSource, exclude: set[int]) -> dict[str, Parameter]:
    """Parameters of an optimizer / EMA by name, without the network's own (which they usually hold)."""
    if hasattr(source, "parameters_dict"):
        items = source.parameters_dict().items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        items = ((p.name, p) for p in source)
    return {name: p for name, p in items if id(p) not in exclude}


def network_params(network: nn.Cell) -> dict[str, Parameter]:
    return dict(network.parameters_dict())


def assign_tensors(targets: Mapping[str, Parameter], values: Mapping[str, Tensor], what: str, strict: bool) -> None:
    """Copy `values` into `targets` by name; shape mismatches always fail, name mismatches when strict."""
    missing = sorted(set(targets) - set(values))
    unexpected = sorted(set(values) - set(targets))
    wrong_shape = [f"{n}: checkpoint {tuple(values[n].shape)} vs model {tuple(targets[n].shape)}"
                   for n in targets if n in values and tuple(values[n].shape) != tuple(targets[n].shape)]
    if wrong_shape:
        shown = "; ".join(wrong_shape[:20])
        raise ValueError(f"{what}: shape mismatch for {len(wrong_shape)} tensors: {shown}")
    if missing or unexpected:
        message = (f"{what}: {len(missing)} missing from the checkpoint {_listing(missing)}, "
                   f"{len(unexpected)} in the checkpoint but not in the model {_listing(unexpected)}")
        if strict:
            raise KeyError(message + " (pass strict=False to load the matching ones)")
        log.warning(message)
    for name, param in targets.items():
        if name in values:
            value = values[name]
            param.set_data(value if value.dtype == param.dtype else value.astype(param.dtype))


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"


def with_prefix(prefix: str, params: Mapping[str, Parameter]) -> dict[str, Parameter]:
    return {prefix + name: p for name, p in params.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def _is_network_key(name: str) -> bool:
    return not name.startswith((OPTIMIZER_PREFIX, EMA_PREFIX, STEP_PREFIX))


def load_network_tensors(tensors: Mapping[str, Tensor], network: nn.Cell, path: Path | str, strict: bool,
                  skip: Sequence[str] = ()) -> None:
    weights = {name: t for name, t in tensors.items() if _is_network_key(name) and name not in skip}
    targets = {name: p for name, p in network_params(network).items() if name not in skip}
    assign_tensors(targets, weights, f"network weights from {path}", strict)


def load_weights(path: Path | str, network: nn.Cell, strict: bool = True, ema: bool = False,
                 skip: Sequence[str] = ()) -> dict[str, Any]:
    """Load only network weights (optimizer state ignored); returns the checkpoint's extra dict.

    `ema=True` loads the EMA weights saved with the checkpoint into the network instead (for evaluation); the
    parameters named in `skip` keep their values on both sides (e.g. classifier heads when fine-tuning).
    """
    tensors, extra = read_checkpoint(path)
    if ema:
        tensors = strip_prefix(EMA_PREFIX, tensors)
        if not tensors:
            raise KeyError(f"{path} holds no EMA weights: train with EMA enabled or load without ema=True")
    load_network_tensors(tensors, network, path, strict, skip)
    return extra


def assign_in_place(param: Parameter, value: Tensor | np.ndarray) -> None:
    """Write `value` into `param`'s existing buffer.

    A graph compiled before `Parameter.set_data` / `load_param_into_net` keeps using the old buffer (measured
    for optimizer state and lrs); an in-place assign is seen by every compiled graph.
    """
    array = np.asarray(value.asnumpy() if isinstance(value, Tensor) else value)
    if array.shape != tuple(param.shape):
        raise ValueError(f"{param.name}: got shape {array.shape}, expected {tuple(param.shape)}.")
    ops.assign(param, Tensor(array, param.dtype))
