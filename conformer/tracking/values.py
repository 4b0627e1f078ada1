"""What MLflow is given: params and tags as strings within MLflow's limits (no URI's user info), configs flattened
to dotted keys, metric values as floats, and the standard tags of a run."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from conformer.secrets import redact


def truncate(value: str, limit: int) -> str:
    """`value` as MLflow may store it: no URI's user info (a secret), at most `limit` characters."""
    value = redact(value)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def to_str(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _plain(node: Any) -> Any:
    """Nested containers with OmegaConf nodes resolved into plain dicts and lists."""
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        except InterpolationResolutionError as err:
            raise ValueError(f"cannot log the config: an interpolation does not resolve here ({err}); "
                             "pass a config whose interpolations resolve in this process.") from err
    if isinstance(node, Mapping):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    return node


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def flatten_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, str]:
    """Dotted keys ("optim.optimizer.lr") to strings.

    Interpolations are resolved, lists become JSON, empty mappings "{}", and values are truncated to MLflow's
    parameter limit.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"flatten_config expects a mapping or DictConfig, got {type(cfg).__name__}")
    flat: dict[str, Any] = {}
    for key, value in _plain(cfg).items():
        _flatten(value, str(key), flat)
    return {key: truncate(to_str(value), MAX_PARAM_VAL_LENGTH) for key, value in flat.items()}


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def metric_float(key: str, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from err


def run_tags(*, model: str | None = None, data: str | None = None, hardware: str | None = None,
             task: str | None = None, overrides: Sequence[str] = (), git_commit: str | None = None,
             run_dir: Path | str | None = None, world_size: int = 1,
             extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags for a run; values that are None are left out, the commit goes to MLflow's own git tag."""
    tags: dict[str, Any] = {
        "model": model, "data": data, "hardware": hardware, "task": task,
        "overrides": " ".join(overrides), MLFLOW_GIT_COMMIT: git_commit,
        "run_dir": str(run_dir) if run_dir is not None else None, "world_size": world_size,
        **(extra or {}),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


