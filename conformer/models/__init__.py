"""Conformer models and their named variants."""
from conformer.models.conformer_net import Conformer, validate_image_size
from conformer.models.registry import (
    VARIANTS,
    build_model,
    create_model,
    load_pretrained,
    model_names,
    variant_kwargs,
)

__all__ = ["Conformer", "VARIANTS", "build_model", "create_model", "load_pretrained", "model_names",
           "validate_image_size", "variant_kwargs"]
