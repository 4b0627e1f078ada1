"""One training step of the port against the official PyTorch step (tiny_train_anchor.npz).

Loss, logits, BatchNorm statistics and every gradient upstream of the CNN branch's ReLUs match to the tolerances
below (max error relative to the largest reference value). Deeper in the CNN branch one ReLU input sits at 1.2e-6
(float32 noise around zero) in conv_trans.4.cnn_block: on the project's kernels the two frameworks take opposite
sides of it, and that single mask bit moves the gradients of everything upstream of it by up to ~6% (per tensor,
relative to its largest entry). Those tensors are compared by direction instead (cosine similarity >= 1 - 1e-4), and
so are the AdamW updates they drive. On MindSpore's ops (`hardware.kernels=mindspore`) the tie falls on PyTorch's side.

Each tolerance is about 10x the error measured on both kernel paths (MindSpore 2.10, x86 CPU), except where a
tighter limit than the old round 1e-4 is not possible (said so below; none was loosened).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from conformer.models.convert import mindspore_name, network_shapes
from conformer.train.losses import DualHeadLoss
from conformer.train.optim import build_optimizer
from conformer.train.step import TrainStep

from .parity import REFERENCE, max_rel_error, reference_model

# train-mode conv logits: measured 8.9e-6 (kernels) / 1.0e-5 (MindSpore's ops); trans logits 5.4e-7 / 4.6e-7
CONV_LOGITS_TOL = 1e-4
TRANS_LOGITS_TOL = 5e-6
# the loss, relative: measured 0 (kernels) / 2.1e-7 (MindSpore's ops), in the gradient test and the train step
LOSS_TOL = 2e-6
# gradients of the tensors before the tie: measured 7.5e-5 (kernels, conv_trans.4.fusion_block.conv3.weight) / 5.1e-5
# (MindSpore's ops): a 1.3x margin, kept at 1e-4 (the earlier limit; 10x would loosen it)
GRAD_TOL = 1e-4
# their direction: 1 - cosine measured 9.0e-10 (kernels) / 8.0e-10 (MindSpore's ops)
TIE_FREE_DIRECTION_TOL = 1e-8
# every gradient's direction, the tie's included: 1 - cosine measured 8.2e-5 (kernels, conv_trans.4.cnn_block.bn3.gamma)
# / 8.0e-10 (MindSpore's ops): kept at 1e-4
DIRECTION_TOL = 1e-4
# BatchNorm running statistics after the step: measured 7.5e-6 (kernels) / 7.3e-6 (MindSpore's ops): 13x
BN_STATS_TOL = 1e-4
# AdamW from the official gradients: measured 3.5e-7
ADAMW_TOL = 4e-6
# the train step's AdamW updates against the official ones, 1 - cosine: median measured 1.2e-10 (kernels); the
# smallest cosine 0.938 (kernels, conv_trans.1.fusion_block.bn1.beta: upstream of the tie), tested at 0.9
UPDATE_MEDIAN_DIRECTION_TOL = 1e-9
UPDATE_MIN_COSINE = 0.9
# Parameters the backward pass reaches before the ReLU tie (all of them sit after it in the forward pass).
TIE_FREE = ("conv_cls_head.", "trans_cls_head.", "trans_norm.", "conv_trans.4.trans_block.",
            "conv_trans.4.squeeze_block.", "conv_trans.4.expand_block.", "conv_trans.4.fusion_block.")
# Gradients that are zero in exact arithmetic (a conv bias right before a training-mode BatchNorm).
ZERO_GRAD = 1e-7


@pytest.fixture(scope="module")
def anchor() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "tiny_train_anchor.npz") as data:
        return {key: data[key] for key in data.files}


def by_mindspore_name(anchor: dict[str, np.ndarray], prefix: str, names: set[str]) -> dict[str, np.ndarray]:
    """Anchor entries under `prefix/`, re-keyed by MindSpore parameter name."""
    out = {}
    for key, value in anchor.items():
        if key.startswith(prefix + "/"):
            name = mindspore_name(key[len(prefix) + 1:], names)
            if name is not None:
                out[name] = value
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_loss_gradients_and_batchnorm_stats_match_official(anchor: dict[str, np.ndarray], kernel_path: str) -> None:
    model = reference_model(train=True)
    loss_fn = DualHeadLoss()
    params = model.trainable_params()

    def forward(x: ms.Tensor, y: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor, ms.Tensor]:
        conv, trans = model(x)
        return loss_fn((conv, trans), y), conv, trans

    grad_fn = ms.value_and_grad(forward, grad_position=None, weights=params, has_aux=True)
    (loss, conv, trans), grads = ms.jit(grad_fn)(ms.Tensor(anchor["x"]), ms.Tensor(anchor["y"].astype(np.int32)))

    assert max_rel_error(conv.asnumpy(), anchor["conv_logits_train"]) < CONV_LOGITS_TOL
    assert max_rel_error(trans.asnumpy(), anchor["trans_logits_train"]) < TRANS_LOGITS_TOL
    assert abs(float(loss) - float(anchor["loss"])) / abs(float(anchor["loss"])) < LOSS_TOL

    names = set(network_shapes(model))
    expected = by_mindspore_name(anchor, "grad", names)
    assert {p.name for p in params} == set(expected)
    tie_free, directions, tie_free_directions = {}, {}, {}
    for param, grad in zip(params, grads):
        got, ref = grad.asnumpy(), expected[param.name]
        if np.abs(ref).max() < ZERO_GRAD:
            assert np.abs(got).max() < 10 * ZERO_GRAD, param.name
            continue
        directions[param.name] = cosine(got, ref)
        if param.name.startswith(TIE_FREE):
            tie_free[param.name] = max_rel_error(got, ref)
            tie_free_directions[param.name] = directions[param.name]
    assert len(tie_free) >= 35
    assert max(tie_free.values()) < GRAD_TOL, max(tie_free.items(), key=lambda kv: kv[1])
    assert min(tie_free_directions.values()) > 1 - TIE_FREE_DIRECTION_TOL, min(tie_free_directions.items(),
                                                                               key=lambda kv: kv[1])
    assert min(directions.values()) > 1 - DIRECTION_TOL, min(directions.items(), key=lambda kv: kv[1])

    expected_bn = by_mindspore_name(anchor, "bn_after", names)
    current = model.parameters_dict()
    bn_errors = {name: max_rel_error(current[name].asnumpy(), value) for name, value in expected_bn.items()}
    assert len(bn_errors) == 2 * 43  # running mean and var of every BatchNorm
    assert max(bn_errors.values()) < BN_STATS_TOL, max(bn_errors.items(), key=lambda kv: kv[1])


def test_adamw_update_from_official_gradients_matches_official(anchor: dict[str, np.ndarray], kernel_path: str) -> None:
    """Our optimizer, fed the official gradients, lands on the official weights (bias correction included)."""
    model = reference_model(train=True)
    names = set(network_shapes(model))
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                                filter_bias_and_bn=False)  # the anchor decays every parameter
    official_grads = by_mindspore_name(anchor, "grad", names)
    optimizer(tuple(ms.Tensor(official_grads[p.name]) for p in optimizer.parameters))
    expected = by_mindspore_name(anchor, "adamw_after", names)
    current = model.parameters_dict()
    errors = {name: max_rel_error(current[name].asnumpy(), ref) for name, ref in expected.items()}
    assert len(errors) == len(model.trainable_params())
    assert max(errors.values()) < ADAMW_TOL, max(errors.items(), key=lambda kv: kv[1])


def test_train_step_matches_official_loss_and_update_direction(anchor: dict[str, np.ndarray]) -> None:
    """The whole step on the default path (the MindSpore path's forward, backward and optimizer are the tests above
    on both paths)."""
    model = reference_model(train=True)
    before = {name: p.asnumpy().copy() for name, p in model.parameters_dict().items()}
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                                filter_bias_and_bn=False)
    result = TrainStep(model, DualHeadLoss(), optimizer)(
        ms.Tensor(anchor["x"]), ms.Tensor(anchor["y"].astype(np.int32)))
    assert abs(result.loss - float(anchor["loss"])) / float(anchor["loss"]) < LOSS_TOL

    names = set(network_shapes(model))
    expected = by_mindspore_name(anchor, "adamw_after", names)
    official_grads = by_mindspore_name(anchor, "grad", names)
    current = model.parameters_dict()
    # Adam's first step is ~lr * sign(grad): near-zero gradient entries may flip, so compare directions
    # (skipping the gradients that are zero in exact arithmetic: their sign is float noise on both sides).
    updates = {name: cosine(current[name].asnumpy() - before[name], ref - before[name])
               for name, ref in expected.items() if np.abs(official_grads[name]).max() >= ZERO_GRAD}
    assert np.median(list(updates.values())) > 1 - UPDATE_MEDIAN_DIRECTION_TOL
    assert min(updates.values()) > UPDATE_MIN_COSINE, min(updates.items(), key=lambda kv: kv[1])
    # BN running statistics advanced exactly as in the official step.
    bn = by_mindspore_name(anchor, "bn_after", set(network_shapes(model)))
    assert max(max_rel_error(current[name].asnumpy(), value) for name, value in bn.items()) < BN_STATS_TOL
