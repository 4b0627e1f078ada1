"""The Conformer port: parameter counts, early shape errors and parity with the official PyTorch model."""
from __future__ import annotations

import gc
import json
import weakref

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from conformer.models import Conformer, create_model, model_names
from conformer.models.conformer_net import DropPath, drop_path_masks

from .parity import REFERENCE, max_rel_error, reference_model

OFFICIAL = {"conformer_ti": "Conformer_tiny_patch16", "conformer_s": "Conformer_small_patch16",
            "conformer_s32": "Conformer_small_patch32", "conformer_b": "Conformer_base_patch16"}


def count(model: Conformer) -> int:
    return sum(int(np.prod(p.shape)) for p in model.trainable_params())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_count_equals_official(name: str) -> None:
    expected = json.loads((REFERENCE / "param_counts.json").read_text())[OFFICIAL[name]]["params"]
    assert count(create_model(name)) == expected


def test_nano_is_the_reference_tiny_config() -> None:
    expected = json.loads((REFERENCE / "param_counts.json").read_text())["tiny"]["params"]
    assert count(create_model("conformer_nano", num_classes=10)) == expected == 1_292_964
    assert model_names() == ["conformer_b", "conformer_nano", "conformer_s", "conformer_s32", "conformer_ti"]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(img_size=72), "multiple of the patch size 16"),
    (dict(depth=7), "multiple of 3"),
    (dict(embed_dim=100, num_heads=3), "divisible by num_heads"),
    (dict(num_classes=0), "num_classes must be positive"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_bad_arguments_fail_early_with_a_clear_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("conformer_nano", **kwargs)


def test_unknown_variant_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="conformer_ti"):
        create_model("conformer_xl")


def test_eval_logits_match_official(kernel_path: str) -> None:
    io = np.load(REFERENCE / "tiny_io.npz")
    conv, trans = reference_model()(ms.Tensor(io["x"]))
    assert max_rel_error(conv.asnumpy(), io["conv_logits"]) < 1e-4
    assert max_rel_error(trans.asnumpy(), io["trans_logits"]) < 1e-4
    assert max_rel_error((conv + trans).asnumpy(), io["sum_logits"]) < 1e-4
    np.testing.assert_allclose(trans.asnumpy(), io["trans_logits"], rtol=1e-4, atol=1e-5)


def test_intermediate_features_match_official(kernel_path: str) -> None:
    """Walk the network block by block (PyNative) and compare every recorded intermediate."""
    feats = np.load(REFERENCE / "tiny_feats.npz")
    x = ms.Tensor(np.load(REFERENCE / "tiny_io.npz")["x"])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model = reference_model()
        stem = model.bn1(model.conv1(x))
        got = {"x_base": model.maxpool(stem if model.act1 is None else model.act1(stem))}  # None: bn1 fuses it
        got["conv_1"], _ = model.conv_1(got["x_base"])
        got["trans_patch_conv"] = model.trans_patch_conv(got["x_base"])
        tokens = got["trans_patch_conv"].reshape(2, model.embed_dim, -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(model.cls_token, (2, 1, model.embed_dim))
        x_t = got["trans_1"] = model.trans_1(ops.concat((cls, tokens), axis=1))
        conv = got["conv_1"]
        for offset, block in enumerate(model.conv_trans):
            i = offset + 2
            conv_out, x2 = block.cnn_block(conv)
            h, w = x2.shape[2] // block.dw_stride, x2.shape[3] // block.dw_stride
            got[f"conv_trans_{i}/fcu_down"] = x_st = block.squeeze_block(x2, x_t)
            x_t_new = block.trans_block(x_st + x_t)
            got[f"conv_trans_{i}/fcu_up"] = up = block.expand_block(x_t_new, h, w)
            conv, _ = block.fusion_block(conv_out, up)
            got[f"conv_trans_{i}/x"], got[f"conv_trans_{i}/x_t"] = conv, x_t_new
            x_t = x_t_new
        got["trans_norm"] = model.trans_norm(x_t)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert set(got) == set(feats.files)
    errors = {name: max_rel_error(got[name].asnumpy(), feats[name]) for name in feats.files}
    assert max(errors.values()) < 1e-4, errors


def test_input_of_wrong_size_is_refused_before_compiling() -> None:
    model = create_model("conformer_nano", num_classes=10, img_size=64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.check_input_shape((2, 3, 40, 40))


def test_drop_path_masks_come_from_their_key_alone_with_timm_scaling() -> None:
    rates = create_model("conformer_nano", num_classes=10, drop_path_rate=0.3).drop_path_rates
    depth = len(rates) // 2  # two masks per transformer block
    assert rates == tuple(r for r in np.linspace(0, 0.3, depth) for _ in range(2))
    assert create_model("conformer_nano", num_classes=10).drop_path_rates == ()  # no masks to draw, none fed

    masks = drop_path_masks(rates, 4096, (7, 0, 11))
    np.testing.assert_array_equal(masks, drop_path_masks(rates, 4096, (7, 0, 11)))  # a resumed step draws the same
    assert not np.array_equal(masks, drop_path_masks(rates, 4096, (7, 0, 12)))
    assert not np.array_equal(masks, drop_path_masks(rates, 4096, (7, 1, 11)))  # each rank its own
    for row, rate in zip(masks, rates):
        keep = 1.0 - rate
        assert set(np.unique(row)) <= {0.0, np.float32(1.0 / keep)}
        assert abs((row > 0).mean() - keep) < 0.03, (rate, (row > 0).mean())
    np.testing.assert_array_equal(masks[:2], 1.0)  # the first block's rate is 0


def test_drop_path_applies_a_given_mask_per_sample_in_training_only() -> None:
    cell = DropPath(0.5)
    x = ms.Tensor(np.ones((3, 4, 5), np.float32))
    mask = ms.Tensor(np.array([2.0, 0.0, 2.0], np.float32))
    cell.set_train(True)
    out = cell(x, mask).asnumpy()
    np.testing.assert_array_equal(out[0], 2.0)
    np.testing.assert_array_equal(out[1], 0.0)
    cell.set_train(False)
    np.testing.assert_array_equal(cell(x, mask).asnumpy(), 1.0)


def test_a_model_that_ran_is_freed_once_dropped() -> None:
    """A sweep builds a model per trial in one process: its compiled graph must not keep the model alive. (A Tensor
    method called on a Parameter attribute inside construct made MindSpore hold the cell: ~50 MB per trial.)"""
    model = create_model("conformer_nano", num_classes=3, img_size=16, depth=3)
    model.set_train(False)
    model(ms.Tensor(np.zeros((2, 3, 16, 16), np.float32)))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
