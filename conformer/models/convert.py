"""Official PyTorch Conformer weights -> MindSpore checkpoint.

Usage: `python -m conformer.models.convert SRC DST --model conformer_ti [--num-classes N]`.
SRC is a `.pth` state_dict (or a dict holding it under `model` / `state_dict`; reading it needs the `[torch]`
extra) or an `.npz` with the same key names. Every key must map: a key left over on either side, or a shape that
differs from the chosen model, is an error that names the keys.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import mindspore as ms
import numpy as np

from conformer.models.checkpoint_file import save_checkpoint
from conformer.models.conformer_net import Conformer
from conformer.models.registry import model_arguments, model_names

# Keys with no MindSpore counterpart: BN's batch counter is unused with a fixed momentum.
IGNORED_SUFFIXES = (".num_batches_tracked",)
_BLOCK_RE = re.compile(r"^conv_trans_(\d+)\.")
_FIRST_BLOCK_INDEX = 2  # the official model numbers its ConvTransBlocks from 2


class ConversionError(ValueError):
    """The source weights do not fit the chosen model."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read an official state_dict from `.pth`/`.pt`/`.pth.tar` (needs torch) or `.npz` as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path.name} needs PyTorch; install the extra with `pip install -e '.[torch]'` "
            "or convert the file to .npz elsewhere") from err
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {key: value.detach().cpu().numpy() for key, value in obj.items()}


def mindspore_name(torch_key: str, target_names: set[str]) -> str | None:
    """MindSpore parameter name for an official key, or None for keys that have no counterpart."""
    if torch_key.endswith(IGNORED_SUFFIXES):
        return None
    name = _BLOCK_RE.sub(lambda m: f"conv_trans.{int(m.group(1)) - _FIRST_BLOCK_INDEX}.", torch_key)
    module, _, leaf = name.rpartition(".")
    prefix = f"{module}." if module else ""
    if leaf == "running_mean":
        return prefix + "moving_mean"
    if leaf == "running_var":
        return prefix + "moving_variance"
    if leaf in ("weight", "bias") and prefix + "gamma" in target_names:  # a BatchNorm or LayerNorm
        return prefix + ("gamma" if leaf == "weight" else "beta")
    return name


def convert_state_dict(state: Mapping[str, np.ndarray], target_shapes: Mapping[str, tuple[int, ...]],
                       skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Map official keys onto `target_shapes` (name -> shape); raise ConversionError naming every misfit.

    `skip` lists MindSpore parameter names to leave out on both sides (e.g. classifier heads when fine-tuning).
    """
    names = set(target_shapes)
    converted: dict[str, np.ndarray] = {}
    unmapped, bad_shapes, misfit = [], [], set()
    for key, value in state.items():
        name = mindspore_name(key, names)
        if name is None or name in skip:
            continue
        if name not in names:
            unmapped.append(key)
            continue
        value = np.asarray(value, dtype=np.float32)
        if tuple(value.shape) != tuple(target_shapes[name]):
            bad_shapes.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target_shapes[name])}")
            misfit.add(name)
            continue
        converted[name] = value
    missing = sorted(names - set(converted) - set(skip) - misfit)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} source keys have no place in the model: {_listing(sorted(unmapped))}")
    if missing:
        problems.append(f"{len(missing)} model parameters have no source key: {_listing(missing)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shapes differ: {_listing(bad_shapes, sep='; ')}")
    if problems:
        raise ConversionError("the weights do not fit the model:\n  " + "\n  ".join(problems))
    return converted


def _listing(items: list[str], limit: int = 12, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}... and {len(items) - limit} more"


def network_shapes(network) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in network.parameters_dict().items()}


def model_shapes(model: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a named variant (built once, on the host)."""
    return network_shapes(Conformer(**model_arguments(model, {"num_classes": num_classes, "img_size": None})))


def infer_num_classes(state: Mapping[str, np.ndarray]) -> int:
    if "conv_cls_head.bias" not in state:
        raise ConversionError("the source has no conv_cls_head.bias: is it a Conformer state_dict?")
    return int(np.asarray(state["conv_cls_head.bias"]).shape[0])


def convert_file(src: str | Path, dst: str | Path, model: str, num_classes: int | None = None) -> Path:
    """Convert an official checkpoint file into a MindSpore `.ckpt` for the named variant."""
    state = read_state_dict(src)
    classes = num_classes if num_classes is not None else infer_num_classes(state)
    converted = convert_state_dict(state, model_shapes(model, classes))
    params = [{"name": name, "data": ms.Tensor(value)} for name, value in converted.items()]
    dst = Path(dst)
    save_checkpoint(params, dst, extra={"source": str(src), "model": model, "num_classes": classes})
    return dst


def load_official_weights(network, path: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Load official `.pth`/`.npz` weights straight into `network`; returns the names left out by `skip`."""
    converted = convert_state_dict(read_state_dict(path), network_shapes(network), skip=skip)
    params = {name: ms.Parameter(ms.Tensor(value), name=name) for name, value in converted.items()}
    not_loaded, _ = ms.load_param_into_net(network, params, strict_load=True)
    missed = sorted(set(not_loaded) - set(skip))
    if missed:
        raise ConversionError(f"parameters not loaded: {', '.join(missed)}")
    return sorted(skip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformer.models.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="official weights: .pth (needs the [torch] extra) or .npz")
    parser.add_argument("dst", help="MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--model", required=True, choices=model_names(), help="variant, as in conf/model/")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count of the weights (default: read from the classifier heads)")
    args = parser.parse_args(argv)
    try:
        out = convert_file(args.src, args.dst, args.model, args.num_classes)
    except (ConversionError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
