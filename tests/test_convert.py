"""The official-weights converter: key mapping, full-size layouts, errors, CLI."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conformer.models import create_model
from conformer.models.convert import (
    ConversionError,
    convert_state_dict,
    model_shapes,
    network_shapes,
    read_state_dict,
)

from .parity import EVAL_LOGITS_TOL, REFERENCE, max_rel_error

ROOT = Path(__file__).resolve().parents[1]


def official_layout(name: str) -> dict[str, list[int]]:
    return json.loads((REFERENCE / "official_state_dict_shapes.json").read_text())[name]["state_dict"]


@pytest.mark.parametrize("name", ["conformer_ti", "conformer_s", "conformer_s32", "conformer_b"])
def test_full_size_official_layouts_map_every_key(name: str) -> None:
    layout = official_layout(name)
    rng = np.random.default_rng(0)
    state = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in layout.items()}
    shapes = model_shapes(name)
    converted = convert_state_dict(state, shapes)
    assert set(converted) == set(shapes)
    assert len(layout) == 718 and len(converted) == 718 - sum(k.endswith("num_batches_tracked") for k in layout)
    # Values land where they belong, e.g. a deep block's BN running variance and the last fusion residual.
    np.testing.assert_array_equal(converted["conv_trans.10.fusion_block.residual_bn.moving_variance"],
                                  state["conv_trans_12.fusion_block.residual_bn.running_var"])
    np.testing.assert_array_equal(converted["trans_norm.gamma"], state["trans_norm.weight"])


def test_leftover_and_missing_keys_are_named() -> None:
    state = dict(np.load(REFERENCE / "tiny_state.npz"))
    state["extra.head.weight"] = np.zeros(3, np.float32)
    del state["conv_trans_3.squeeze_block.ln.bias"]
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, model_shapes("conformer_nano", 10))
    assert "extra.head.weight" in str(err.value)
    assert "conv_trans.1.squeeze_block.ln.beta" in str(err.value)


def test_shape_mismatch_names_the_key() -> None:
    state = dict(np.load(REFERENCE / "tiny_state.npz"))
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, model_shapes("conformer_nano", 5))  # a 10-class source, a 5-class model
    message = str(err.value)
    assert "4 shapes differ" in message and "have no source key" not in message
    assert "conv_cls_head.weight (10, 256) -> conv_cls_head.weight (5, 256)" in message


def test_long_mismatch_listings_are_abbreviated() -> None:
    state = dict(np.load(REFERENCE / "tiny_state.npz"))
    with pytest.raises(ConversionError, match=r"\.\.\. and \d+ more") as err:
        convert_state_dict(state, model_shapes("conformer_ti", 10))  # same keys, every width differs
    assert len(str(err.value)) < 5000


def test_pth_without_torch_explains_the_extra(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: the missing-extra message cannot appear")
    src = tmp_path / "w.pth"
    src.write_bytes(b"\x80\x02")
    with pytest.raises(ImportError, match=r"\.\[torch\]"):
        read_state_dict(src)


def test_cli_writes_a_checkpoint_that_reproduces_the_reference(tmp_path: Path) -> None:
    dst = tmp_path / "tiny.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "conformer.models.convert", str(REFERENCE / "tiny_state.npz"), str(dst),
         "--model", "conformer_nano"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert dst.is_file()
    model = create_model("conformer_nano", num_classes=10, img_size=64)
    not_loaded, _ = ms.load_param_into_net(model, ms.load_checkpoint(str(dst)))
    assert not_loaded == []
    model.set_train(False)
    io = np.load(REFERENCE / "tiny_io.npz")
    conv, trans = model(ms.Tensor(io["x"]))
    assert max_rel_error(conv.asnumpy(), io["conv_logits"]) < EVAL_LOGITS_TOL
    assert max_rel_error(trans.asnumpy(), io["trans_logits"]) < EVAL_LOGITS_TOL


def test_cli_reports_a_mismatch_with_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conformer.models.convert", str(REFERENCE / "tiny_state.npz"), str(tmp_path / "x.ckpt"),
         "--model", "conformer_ti"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "shapes differ" in proc.stderr and not (tmp_path / "x.ckpt").exists()


def test_network_shapes_cover_buffers() -> None:
    shapes = network_shapes(create_model("conformer_nano", num_classes=10))
    assert shapes["bn1.moving_variance"] == (64,) and shapes["cls_token"] == (1, 1, 96)
