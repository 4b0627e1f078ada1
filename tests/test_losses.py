"""DualHeadLoss against numpy references (smoothed hard labels, soft targets), compiled in graph mode."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from mindspore import Tensor
from omegaconf import OmegaConf

from conformer.train.losses import DualHeadLoss, cross_entropy

CONF = Path(__file__).resolve().parents[1] / "conf"
B, C = 6, 5


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def torch_ce(logits: np.ndarray, target: np.ndarray, smoothing: float) -> float:
    """torch.nn.CrossEntropyLoss(label_smoothing=s): (1 - s) * nll + s * mean_c(-log p), batch mean."""
    logp = log_softmax(logits.astype(np.float64))
    nll = -logp[np.arange(len(target)), target]
    return float(((1 - smoothing) * nll + smoothing * (-logp.mean(axis=-1))).mean())


def soft_ce(logits: np.ndarray, target: np.ndarray) -> float:
    return float((-target * log_softmax(logits.astype(np.float64))).sum(axis=-1).mean())


@pytest.fixture(scope="module")
def logits() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, (B, C)).astype(np.float32), rng.normal(0, 3, (B, C)).astype(np.float32)


def as_tensors(pair: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor]:
    return Tensor(pair[0]), Tensor(pair[1])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_hard_labels_match_torch_label_smoothing(logits, smoothing: float, dtype) -> None:
    target = np.array([0, 4, 2, 2, 1, 3], dtype=dtype)
    loss = DualHeadLoss(smoothing)(as_tensors(logits), Tensor(target))
    expected = 0.5 * torch_ce(logits[0], target, smoothing) + 0.5 * torch_ce(logits[1], target, smoothing)
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-5)


def test_soft_targets_ignore_smoothing_and_match_reference(logits) -> None:
    rng = np.random.default_rng(1)
    target = rng.random((B, C)).astype(np.float32)
    target /= target.sum(axis=1, keepdims=True)
    loss = DualHeadLoss(0.1)(as_tensors(logits), Tensor(target))
    expected = 0.5 * soft_ce(logits[0], target) + 0.5 * soft_ce(logits[1], target)
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-5)


def test_head_losses_are_the_per_head_terms(logits) -> None:
    target = np.array([1, 1, 0, 4, 3, 2], dtype=np.int32)
    conv, trans = DualHeadLoss(0.2).head_losses(as_tensors(logits), Tensor(target))
    assert float(conv.asnumpy()) == pytest.approx(torch_ce(logits[0], target, 0.2), rel=1e-5)
    assert float(trans.asnumpy()) == pytest.approx(torch_ce(logits[1], target, 0.2), rel=1e-5)
    single = cross_entropy(Tensor(logits[1]), Tensor(target), 0.2)
    assert float(single.asnumpy()) == pytest.approx(torch_ce(logits[1], target, 0.2), rel=1e-5)


def test_bad_inputs_fail_with_a_clear_message(logits) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        DualHeadLoss(1.0)
    with pytest.raises(ValueError, match="soft targets"):
        DualHeadLoss()(as_tensors(logits), Tensor(np.zeros((B, C, 1), np.float32)))


def test_hydra_config_builds_the_recipe_loss() -> None:
    loss = instantiate(OmegaConf.load(CONF / "loss" / "dual_ce.yaml"))
    assert isinstance(loss, DualHeadLoss) and loss.label_smoothing == pytest.approx(0.1)
