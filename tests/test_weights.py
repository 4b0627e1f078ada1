"""conformer.models.weights: loading by file type, and fine-tuning onto another class count (the heads start fresh)."""
from __future__ import annotations

import logging
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conformer.models import create_model, weights
from conformer.models.checkpoint_file import save_checkpoint

from .parity import REFERENCE

HEADS = set(weights.HEAD_PARAMETERS)


def _params(network) -> dict[str, np.ndarray]:
    return {name: p.asnumpy().copy() for name, p in network.parameters_dict().items()}


@pytest.mark.parametrize("kind", ["ckpt", "official npz"])
def test_fine_tuning_loads_everything_but_the_heads_of_another_class_count(kind: str, tmp_path: Path,
                                                                           caplog) -> None:
    if kind == "ckpt":
        ms.set_seed(0)
        source = create_model("conformer_nano", num_classes=10, depth=3, img_size=16)
        path = save_checkpoint(source, tmp_path / "ten.ckpt")
        expected, depth = _params(source), 3
    else:
        path, depth = REFERENCE / "tiny_state.npz", 6
        reference = create_model("conformer_nano", num_classes=10, img_size=64)
        weights.load_into(reference, path)
        expected = _params(reference)
    ms.set_seed(1)
    network = create_model("conformer_nano", num_classes=3, depth=depth, img_size=16)
    fresh = _params(network)
    with caplog.at_level(logging.WARNING, logger="conformer.models.weights"):
        assert set(weights.load_into(network, path, fine_tune=True)) == HEADS
    assert "10 classes, the model 3: its classifier heads are not loaded" in caplog.text
    loaded = _params(network)
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, fresh[name] if name in HEADS else expected[name], err_msg=name)
    assert len(loaded) > len(HEADS)

    with pytest.raises(Exception, match="(?s)shape.*cls_head"):  # strict: today's behaviour
        weights.load_into(network, path)


def test_same_class_count_loads_all_even_when_fine_tuning(tmp_path: Path) -> None:
    ms.set_seed(0)
    source = create_model("conformer_nano", num_classes=3, depth=3, img_size=16)
    path = save_checkpoint(source, tmp_path / "three.ckpt")
    ms.set_seed(1)
    network = create_model("conformer_nano", num_classes=3, depth=3, img_size=16)
    assert weights.load_into(network, path, fine_tune=True) == []
    for name, value in _params(network).items():
        np.testing.assert_array_equal(value, _params(source)[name], err_msg=name)
