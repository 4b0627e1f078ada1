"""Helpers shared by the parity tests: the reference `tiny` model loaded with the official weights, and the
tolerances of its eval-mode parity.

Each tolerance is about 10x the error measured against the official vectors (MindSpore 2.10, x86 CPU, on both kernel
paths: the project's CPU kernels and MindSpore's ops), so an error 10x larger fails; a round 1e-4 let a regression
of 100x through (LayerNorm's eps outside the square root in its kernel took the eval logits from 6e-7 to 1.04e-4:
4% over 1e-4, 17x over EVAL_LOGITS_TOL)."""
from __future__ import annotations

import numpy as np

from conformer.models import Conformer, create_model
from conformer.models.convert import load_official_weights

from .conftest import DATA_DIR

REFERENCE = DATA_DIR / "reference"

# Eval logits, conv / trans / sum, max error relative to the largest reference value. Measured: 2.8e-7 / 6.1e-7 /
# 2.8e-7 (kernels), 4.6e-7 / 3.7e-7 / 4.4e-7 (MindSpore's ops)
EVAL_LOGITS_TOL = 6e-6
# Every intermediate of tiny_feats.npz (stem, FCUDown, FCUUp, each block's maps and tokens, final norm), the same
# measure. Measured: <= 8.6e-7 (kernels), <= 8.4e-7 (MindSpore's ops)
FEATURES_TOL = 9e-6


def reference_model(train: bool = False) -> Conformer:
    """`conformer_nano` (the reference `tiny` config) with `tiny_state.npz` loaded through the converter."""
    model = create_model("conformer_nano", num_classes=10, img_size=64)
    load_official_weights(model, REFERENCE / "tiny_state.npz")
    model.set_train(train)
    return model


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())
