"""The project's value checks, one of each kind: a config key's integer, number or choice (a ConfigError naming the
key), and a component argument's number (a ValueError naming the argument). Plain Python, importable by anything."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from conformer.errors import ConfigError


def number(value: Any, name: str) -> float:
    """`value` as a float, or a ValueError naming the argument (bools and NaN are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}={value!r} must be a number")
    return float(value)


def require_int(value: Any, key: str, minimum: int = 1, hint: str = "") -> int:
    """`value` as an integer >= `minimum`, or a ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}" + (f" ({hint})" if hint else ""))
    return value


def require_number(value: Any, key: str, minimum: float = 0.0, strict: bool = False, hint: str = "") -> float:
    """`value` as a number >= `minimum` (> when `strict`), or a ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (value <= minimum if strict else value < minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ConfigError(f"{key}={value!r} must be a number {bound}" + (f" ({hint})" if hint else ""))
    return float(value)


def require_choice(value: Any, key: str, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def require_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value
