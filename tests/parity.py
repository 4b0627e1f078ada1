"""Helpers shared by the parity tests: the reference `tiny` model loaded with the official weights."""
from __future__ import annotations

import numpy as np

from conformer.convert import load_official_weights
from conformer.models import Conformer, create_model

from .conftest import DATA_DIR

REFERENCE = DATA_DIR / "reference"


def reference_model(train: bool = False) -> Conformer:
    """`conformer_nano` (the reference `tiny` config) with `tiny_state.npz` loaded through the converter."""
    model = create_model("conformer_nano", num_classes=10, img_size=64)
    load_official_weights(model, REFERENCE / "tiny_state.npz")
    model.set_train(train)
    return model


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())
