"""Conformer models: the network (`conformer_net`, MindSpore) and its named variants (`registry`, plain Python).

`Conformer` and `create_model` load MindSpore on first use, so the config checks can read the registry without it.
"""
from __future__ import annotations

from typing import Any

from conformer.models.registry import VARIANTS, model_names, variant_kwargs

__all__ = ["VARIANTS", "Conformer", "create_model", "model_names", "variant_kwargs"]


def __getattr__(name: str) -> Any:
    if name == "Conformer":
        from conformer.models.conformer_net import Conformer

        return Conformer
    if name == "create_model":
        from conformer.models.factory import create_model

        return create_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
