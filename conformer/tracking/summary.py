"""What a person compares runs by: their names, the params worth a column, the user's tags, the dataset input."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from conformer.models.registry import model_name
from conformer.tracking.values import flatten_config

# Config sections a user compares runs by; of `hardware` only the name and the world size.
COMPARED_SECTIONS = ("model", "data", "optim", "loss", "trainer")
PLUMBING_KEYS = ("_target_", "_partial_")  # any key with one of these components
PATH_KEYS = ("data.source.root", "trainer.resume")  # where files are, not how the run differs
MULTIRUN_FILE = "multirun.yaml"  # the basic sweeper's config, in the sweep dir (the trials' run dirs' parent)


# ---------------------------------------------------------------------------------------------------- params
def comparable_params(cfg: DictConfig | Mapping[str, Any], world_size: int) -> dict[str, str]:
    """The flattened model, data, optim, loss and trainer values, the seed, the hardware name and world size:
    no `_target_` / `_partial_`, paths, msrun or tracking plumbing (the whole config is the config.yaml
    artifact)."""
    sections = {key: cfg[key] for key in COMPARED_SECTIONS if key in cfg}
    flat = flatten_config({**sections, "seed": cfg.get("seed"),
                           "hardware": {"name": cfg["hardware"]["name"], "world_size": world_size}})
    return {key: value for key, value in flat.items()
            if key not in PATH_KEYS and not any(part in PLUMBING_KEYS for part in key.split("."))}


# ---------------------------------------------------------------------------------------------------- names
def default_run_name(cfg: DictConfig, run_dir: Path | str) -> str:
    """`tracking.run_name` when set; a sweep trial after its swept overrides (`base_lr=2e-3 weight_decay=0.1`);
    else `<task>-<model>-<data>`."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = swept_overrides(Path(run_dir))
    return " ".join(swept) if swept else f"{cfg.task.name}-{model_name(cfg.model)}-{cfg.data.name}"


def swept_overrides(run_dir: Path) -> list[str]:
    """`<short key>=<short value>` of the overrides a multirun trial in `run_dir` got from its sweep (the keys of
    `hydra.sweeper.params` and of the command line's sweep overrides), sorted; empty for a single run. Read from
    the files Hydra writes (`.hydra/`, the sweep dir's `multirun.yaml`), so msrun workers name the run like their
    parent."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return []
    hydra = _unresolved(OmegaConf.load(hydra_file))["hydra"]
    if not str(hydra.get("mode")).endswith("MULTIRUN"):
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space = {str(k) for k in ((hydra.get("sweeper") or {}).get("params") or {})}
    multirun = run_dir.parent / MULTIRUN_FILE
    if multirun.is_file():
        for override in parser.parse_overrides(_unresolved(OmegaConf.load(multirun))["hydra"]["overrides"]["task"]):
            if override.is_sweep_override():
                space.add(override.key_or_group)
            else:  # the command line fixed a key the sweeper's params sweep
                space.discard(override.key_or_group)
    trial = [o for o in parser.parse_overrides(hydra["overrides"]["task"]) if o.key_or_group in space]
    names = short_labels([o.key_or_group for o in trial])
    return sorted(f"{names[o.key_or_group]}={short_value(o.get_value_element_as_str())}" for o in trial)


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last component ("optim.schedule.base_lr" -> "base_lr"), or the whole key where two keys share
    it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


SIGNIFICANT_DIGITS = 4  # of a float drawn by a search (Optuna): the trial's params hold the exact value


def short_value(value: str) -> str:
    """A swept value as every view of a sweep spells it (run names, the parent's `best.*` tags, trials.csv, the
    printed table, the plot's ticks): a float in its shortest exact form, positional or with an exponent, whichever
    is shorter (`2e-3`, `5e-4`, `0.1`, `0.05`, `1.5e-3`); one with more than 4 significant digits (a draw of a
    search) rounded to 4 (`0.002651`, `6.466e-4`). Integers, words and lists as given."""
    text = value.strip()
    number = _number(text)
    if number is None or not math.isfinite(number) or text.lstrip("+-").isdigit():
        return text
    exact = Decimal(repr(abs(number))).normalize()
    if len(exact.as_tuple().digits) > SIGNIFICANT_DIGITS:
        exact = Decimal(f"{abs(number):.{SIGNIFICANT_DIGITS - 1}e}").normalize()
    digits, exponent = exact.as_tuple().digits, exact.as_tuple().exponent
    mantissa = "".join(map(str, digits))
    scientific = (mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
                  + f"e{exponent + len(digits) - 1}")
    positional = format(exact, "f")
    return ("-" if number < 0 else "") + min(positional, scientific, key=len)  # a tie: positional


def _unresolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- tags
def user_tags(tags: Any) -> dict[str, str]:
    """`tags=[a,b]` (each a tag set to "true") or `tags={k: v}` from the config, as MLflow tags."""
    if isinstance(tags, (DictConfig, ListConfig)):
        tags = OmegaConf.to_container(tags, resolve=True)
    if not tags:
        return {}
    if isinstance(tags, Mapping):
        return {str(key): str(value) for key, value in tags.items()}
    if isinstance(tags, str):
        tags = [tags]
    return {str(tag): "true" for tag in tags}


# ---------------------------------------------------------------------------------------------------- datasets
def image_dataset(name: str, root: str, split: str, images: int, num_classes: int, image_size: int,
                  channels: int = 3) -> Any:
    """An `mlflow.entities.Dataset` for one split of an image dataset: its root as the source, a tensor schema
    (image, label) and a profile with the number of images, so the runs table's Dataset column shows it."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset
    from mlflow.types import Schema, TensorSpec

    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, image_size, image_size), "image")]),
        targets=Schema([TensorSpec(np.dtype(np.int32), (-1,), "label")]))
    profile = {"split": split, "num_images": int(images), "num_classes": int(num_classes),
               "image_size": int(image_size)}
    source = json.dumps({"uri": str(root)})
    digest = hashlib.sha256(json.dumps([name, source, profile], sort_keys=True).encode()).hexdigest()[:8]
    return Dataset(name=name, digest=digest, source_type="local", source=source,
                   schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))
