"""What a person compares runs by: their names, the params worth a column, the user's tags, the dataset input."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
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
    """`<last key component>=<value>` of the overrides a multirun trial in `run_dir` got from its sweep (the keys
    of `hydra.sweeper.params` and of the command line's sweep overrides), sorted; empty for a
    single run. Read from the files Hydra writes (`.hydra/`, the sweep dir's `multirun.yaml`), so msrun workers
    name the run like their parent."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return []
    hydra = _unresolved(OmegaConf.load(hydra_file))["hydra"]
    if not str(hydra.get("mode")).endswith("MULTIRUN"):
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space = {str(k): str(v) for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items()}
    multirun = run_dir.parent / MULTIRUN_FILE
    if multirun.is_file():
        for override in parser.parse_overrides(_unresolved(OmegaConf.load(multirun))["hydra"]["overrides"]["task"]):
            if override.is_sweep_override():
                space[override.key_or_group] = override.get_value_string()
            else:  # the command line fixed a key the sweeper's params sweep
                space.pop(override.key_or_group, None)
    trial = [o for o in parser.parse_overrides(hydra["overrides"]["task"]) if o.key_or_group in space]
    names = _short_keys([o.key_or_group for o in trial])
    values = {o.key_or_group: _as_given(o.get_value_element_as_str(), space[o.key_or_group]) for o in trial}
    return sorted(f"{names[key]}={short_value(value)}" for key, value in values.items())


def short_value(value: str) -> str:
    """A swept value as runs show it: long floats (Optuna's draws) to 4 significant digits, others as spelt."""
    try:
        return f"{float(value):.4g}" if len(value) > 8 else value
    except ValueError:
        return value


def _unresolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last component, or the whole key where two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _as_given(value: str, space: str) -> str:
    """The sweep's own spelling of `value` (`2e-3`, not `0.002`) when its choices list it; floats from a search
    space to 4 significant digits."""
    number = _number(value)
    if number is None:
        return value
    for choice in space.split(","):
        if _number(choice.strip()) == number:
            return choice.strip()
    return value if number == int(number) else f"{number:.4g}"


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
