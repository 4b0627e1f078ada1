"""Mixup/CutMix in batch mode: soft targets, pixel mixing, CutMix box area vs label weight, seeding."""
from __future__ import annotations

import numpy as np
import pytest

from conformer.data.mixup import Mixup, smooth_one_hot

CLASSES = 5


def _batch(size: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images; labels 0..size-1, so every label differs from its mirror's (size <= CLASSES)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, 3, 16, 24)).astype(np.float32)
    labels = np.arange(size, dtype=np.int32) % CLASSES
    return images, labels


def _weight_of_own_label(targets: np.ndarray, labels: np.ndarray, smoothing: float) -> np.ndarray:
    """Recover lam from the soft targets: own-label mass = off + lam * (on - off)."""
    off = smoothing / CLASSES
    on = 1.0 - smoothing + off
    own = targets[np.arange(len(labels)), labels]
    return (own - off) / (on - off)


def test_smooth_one_hot_values() -> None:
    targets = smooth_one_hot(np.array([2, 0]), CLASSES, 0.1)
    assert targets.dtype == np.float32
    np.testing.assert_allclose(targets[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        smooth_one_hot(np.array([5]), CLASSES)


def test_mixup_blends_with_flipped_batch() -> None:
    images, labels = _batch()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1).bind(CLASSES, seed=3)
    out, targets = mixup(images, labels)
    assert out.dtype == np.float32 and targets.dtype == np.float32 and targets.shape == (4, CLASSES)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    lam = _weight_of_own_label(targets, labels, 0.1)
    assert np.allclose(lam, lam[0]) and 0.0 < lam[0] < 1.0
    np.testing.assert_allclose(out, lam[0] * images + (1 - lam[0]) * images[::-1], atol=1e-5)
    one_hot = smooth_one_hot(labels, CLASSES, 0.1)
    expected = lam[0] * one_hot + (1 - lam[0]) * smooth_one_hot(labels[::-1], CLASSES, 0.1)
    np.testing.assert_allclose(targets, expected, atol=1e-6)


def test_cutmix_box_area_matches_label_weight() -> None:
    images, labels = _batch()
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0).bind(CLASSES, seed=0)
    seen_partial = 0
    for _ in range(20):
        out, targets = mixup(images, labels)
        lam = _weight_of_own_label(targets, labels, 0.0)
        pasted = np.all(out == images[::-1], axis=1) & ~np.all(out == images, axis=1)  # [B, H, W]
        kept = np.all(out == images, axis=1)
        assert np.all(pasted | kept)  # every pixel is either its own or its mirror's
        assert np.array_equal(pasted[0], pasted[1])  # one box for the whole batch
        np.testing.assert_allclose(1.0 - pasted.mean(axis=(1, 2)), lam, atol=1e-6)
        seen_partial += 0.0 < lam[0] < 1.0
    assert seen_partial >= 10


def test_switch_prob_and_prob() -> None:
    images, labels = _batch()
    cutmix_only = Mixup(switch_prob=1.0).bind(CLASSES, seed=1)
    out, _ = cutmix_only(images, labels)
    assert np.all((out == images) | (out == images[::-1]))
    off = Mixup(prob=0.0, label_smoothing=0.2).bind(CLASSES, seed=1)
    out, targets = off(images, labels)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, smooth_one_hot(labels, CLASSES, 0.2))


def test_seeded_and_bound_copies_are_reproducible() -> None:
    images, labels = _batch()
    config = Mixup()
    runs = []
    for _ in range(2):
        mixup = config.bind(CLASSES, seed=[7, 0])
        runs.append([mixup(images, labels)[1] for _ in range(5)])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)
    other = config.bind(CLASSES, seed=[7, 1])
    assert not all(np.array_equal(a, other(images, labels)[1]) for a in runs[0])


def test_mixup_errors() -> None:
    images, labels = _batch(size=5)
    with pytest.raises(ValueError, match="even batch size"):
        Mixup().bind(CLASSES)(images, labels)
    with pytest.raises(ValueError, match="num_classes"):
        Mixup()(images[:4], labels[:4])
    with pytest.raises(ValueError, match="dataset has 5"):
        Mixup(num_classes=10).bind(CLASSES)
    with pytest.raises(ValueError, match="batch"):
        Mixup(mode="elem")
