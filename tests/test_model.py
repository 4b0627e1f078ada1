"""The Conformer port: parameter counts, early shape errors and parity with the official PyTorch model."""
from __future__ import annotations

import gc
import json
import weakref

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from conformer import kernels
from conformer.kernels.cells import use_builtin_kernels
from conformer.models import Conformer, create_model, model_names
from conformer.models.conformer_net import BLOCK_NORM_EPS, DropPath, FCUUp, drop_path_masks

from .conftest import KERNEL_PATHS
from .parity import EVAL_LOGITS_TOL, FEATURES_TOL, REFERENCE, max_rel_error, reference_model

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




@pytest.fixture(scope="module")
def reference_models() -> dict[str, Conformer]:
    """The reference model in eval mode on each kernel path, compiled once for the tests that read its logits (a test
    that changes its parameters puts them back)."""
    models = {}
    for path in KERNEL_PATHS:
        with kernels.using(path):
            models[path] = reference_model()
    return models


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_eval_logits_match_official(reference_models: dict[str, Conformer], path: str) -> None:
    io = np.load(REFERENCE / "tiny_io.npz")
    conv, trans = reference_models[path](ms.Tensor(io["x"]))
    assert max_rel_error(conv.asnumpy(), io["conv_logits"]) < EVAL_LOGITS_TOL
    assert max_rel_error(trans.asnumpy(), io["trans_logits"]) < EVAL_LOGITS_TOL
    assert max_rel_error((conv + trans).asnumpy(), io["sum_logits"]) < EVAL_LOGITS_TOL
    # element by element (measured: at most 0.0094 of what rtol=1e-4, atol=1e-5 allows; 10x tighter here)
    np.testing.assert_allclose(trans.asnumpy(), io["trans_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_intermediate_features_match_official(path: str) -> None:
    """Walk the network block by block (PyNative) and compare every recorded intermediate."""
    feats = np.load(REFERENCE / "tiny_feats.npz")
    x = ms.Tensor(np.load(REFERENCE / "tiny_io.npz")["x"])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        with kernels.using(path):
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
    assert max(errors.values()) < FEATURES_TOL, errors


def _fcu_up_definition(tokens: np.ndarray, params: dict[str, np.ndarray], h: int, w: int, stride: int,
                       training: bool) -> np.ndarray:
    """FCUUp in float64: the patch tokens (class token dropped) as an h x w map, 1x1 conv with bias, BatchNorm (batch
    statistics in training, else the moving ones), ReLU, nearest upsampling by `stride`."""
    b = tokens.shape[0]
    weight = params["conv_project.weight"].astype(np.float64)[:, :, 0, 0]
    y = np.einsum("bpc,oc->bop", tokens[:, 1:].astype(np.float64), weight) + params["conv_project.bias"][:, None]
    y = y.reshape(b, -1, h, w)
    if training:
        mean, variance = y.mean((0, 2, 3)), y.var((0, 2, 3))
    else:
        mean, variance = params["bn.moving_mean"], params["bn.moving_variance"]
    y = (y - mean[:, None, None]) / np.sqrt(variance[:, None, None] + BLOCK_NORM_EPS)
    y = np.maximum(y * params["bn.gamma"][:, None, None] + params["bn.beta"][:, None, None], 0.0)
    return np.repeat(np.repeat(y, stride, axis=2), stride, axis=3)


# FCUUp against its float64 definition, relative to the largest output (measured <= 1.6e-7 on both paths, in both
# modes: ~10x margin)
FCU_UP_TOL = 2e-6


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("builtin", [False, True], ids=["kernel", "mindspore"])
def test_fcu_up_is_conv_batch_norm_relu_and_upsampling(builtin: bool, training: bool) -> None:
    """Tokens -> feature map on both kernel paths, with its BatchNorm's gamma, beta and moving statistics away from
    their defaults (the reference weights leave them at 1, 0, 0, 1, where an eval-mode BatchNorm is the identity):
    a missing BatchNorm, ReLU or class-token skip shows in either mode."""
    rng = np.random.default_rng(12)
    cell = FCUUp(12, 16, up_stride=2)
    if builtin:
        assert use_builtin_kernels(cell) == 2  # the 1x1 conv and the BatchNorm
    else:
        assert cell.from_tokens is not None and cell.bn.kernel is not None
    params = {"conv_project.weight": rng.standard_normal((16, 12, 1, 1)) * 0.3,
              "conv_project.bias": rng.standard_normal(16),
              "bn.gamma": rng.uniform(0.5, 2.0, 16), "bn.beta": rng.standard_normal(16),
              "bn.moving_mean": rng.standard_normal(16), "bn.moving_variance": rng.uniform(0.2, 3.0, 16)}
    params = {name: value.astype(np.float32) for name, value in params.items()}
    named = dict(cell.parameters_and_names())
    assert set(named) == set(params)
    for name, value in params.items():
        named[name].set_data(Tensor(value))
    h, w = 4, 3  # not square: a transposed map shows
    tokens = rng.standard_normal((3, 1 + h * w, 12)).astype(np.float32)
    cell.set_train(training)
    got = cell(Tensor(tokens), h, w).asnumpy()
    want = _fcu_up_definition(tokens, params, h, w, 2, training)
    assert got.shape == want.shape == (3, 16, 8, 6)
    assert 0.2 < (want == 0).mean() < 0.8  # the ReLU cuts
    assert max_rel_error(got, want) < FCU_UP_TOL, max_rel_error(got, want)


def _shift_batch_norms(model: nn.Cell, rng: np.random.Generator) -> list[str]:
    """Give every BatchNorm of `model` its own gamma, beta, moving mean and variance near (not at) the defaults;
    return their names."""
    names = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            c = cell.gamma.shape[0]
            for param, value in ((cell.gamma, rng.uniform(0.8, 1.25, c)), (cell.beta, 0.1 * rng.standard_normal(c)),
                                 (cell.moving_mean, 0.1 * rng.standard_normal(c)),
                                 (cell.moving_variance, rng.uniform(0.7, 1.4, c))):
                param.set_data(Tensor(value.astype(np.float32)))
            names.append(name)
    return names


def test_every_batch_norm_of_the_reference_model_normalises_with_its_own_statistics(
        reference_models: dict[str, Conformer]) -> None:
    """The reference model with every BatchNorm's statistics shifted (the official weights leave them at the defaults,
    where eval parity cannot tell a BatchNorm from none): the kernel path equals MindSpore's ops, and each BatchNorm's
    moving mean reaches the logits (one that is skipped, like FCUUp's without its BatchNorm, does not)."""
    x = ms.Tensor(np.load(REFERENCE / "tiny_io.npz")["x"])
    models = [reference_models[path] for path in KERNEL_PATHS]
    saved = [{name: p.asnumpy().copy() for name, p in model.parameters_and_names()} for model in models]
    try:
        for model in models:
            names = _shift_batch_norms(model, np.random.default_rng(13))
        assert len(names) == 43 and sum(".expand_block.bn" in name for name in names) == 5
        base = [np.concatenate([t.asnumpy() for t in model(x)], axis=1) for model in models]
        # kernel path vs MindSpore's ops (measured 3.6e-7: ~10x margin)
        assert max_rel_error(base[0], base[1]) < 4e-6, max_rel_error(base[0], base[1])
        model, unmoved = models[0], []
        cells = dict(model.cells_and_names())
        for name in names:
            moving_mean = cells[name].moving_mean
            before = moving_mean.asnumpy()
            moving_mean.set_data(Tensor(before + 0.5))
            logits = np.concatenate([t.asnumpy() for t in model(x)], axis=1)
            moving_mean.set_data(Tensor(before))
            # measured: the smallest change is 1.7e-3 (conv_trans.4.fusion_block.bn1); a skipped BatchNorm's is 0
            if max_rel_error(logits, base[0]) < 1e-5:
                unmoved.append(name)
        assert not unmoved, unmoved
    finally:
        for model, values in zip(models, saved):
            for name, param in model.parameters_and_names():
                param.set_data(Tensor(values[name]))


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


def test_drop_path_without_a_mask_keeps_a_sample_with_the_keep_probability_scaled_by_its_inverse() -> None:
    """The in-graph draw (no mask given) at drop_prob 0.25, not 0.5: kept samples are scaled by 1 / 0.75 (not 1 / 0.25)
    and about 75% are kept (not 25%), every element of a sample alike."""
    ms.set_seed(3)
    cell = DropPath(0.25)
    cell.set_train(True)
    out = cell(ms.Tensor(np.ones((4000, 3, 2), np.float32))).asnumpy()
    per_sample = out[:, 0, 0]
    np.testing.assert_array_equal(out, np.broadcast_to(per_sample[:, None, None], out.shape))
    assert set(np.unique(per_sample)) == {0.0, np.float32(1.0 / 0.75)}
    assert abs((per_sample > 0).mean() - 0.75) < 0.03, (per_sample > 0).mean()


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
