"""Mixup/CutMix in batch mode: soft targets, pixel mixing, CutMix box area vs label weight, every lam and box against
the seeded Beta draws (and their spread over batches), seeding."""
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


def test_mixup_lambdas_are_the_seeded_beta_draws_and_spread_over_batches() -> None:
    """Every batch's lam is the Beta(alpha, alpha) draw of its seeded stream (one uniform for `prob`, then the Beta),
    so a lam fixed or transformed after the draw shows, and over 40 batches the lams spread like Beta(0.8, 0.8)."""
    images, labels = _batch()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1).bind(CLASSES, seed=11)
    stream = np.random.default_rng(11)
    lams, expected = [], []
    for _ in range(40):
        out, targets = mixup(images, labels)
        stream.random()  # the `prob` draw
        expected.append(stream.beta(0.8, 0.8))
        lam = _weight_of_own_label(targets, labels, 0.1)
        lams.append(lam[0])
        np.testing.assert_allclose(out, lam[0] * images + (1 - lam[0]) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(lams, expected, atol=1e-5)
    # Beta(0.8, 0.8): mean 0.5, standard deviation 0.31; a fixed lam has none
    assert np.std(lams) > 0.2 and min(lams) < 0.2 and max(lams) > 0.8, lams


def _box(height: int, width: int, lam: float, stream: np.random.Generator) -> np.ndarray:
    """CutMix's pasted box for a drawn lam, written out: sides sqrt(1 - lam) of the image's, a uniform centre,
    clipped at the borders."""
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy, cx = stream.integers(0, height), stream.integers(0, width)
    mask = np.zeros((height, width), bool)
    mask[max(cy - cut_h // 2, 0):min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0):min(cx + cut_w // 2, width)] = 1
    return mask


def test_cutmix_boxes_come_from_the_seeded_beta_draws() -> None:
    """Mixup and CutMix switched per batch: each batch's choice, lam and box follow the seeded stream (uniform for
    `prob`, uniform for the switch, the Beta draw of the chosen alpha, then the box centre)."""
    images, labels = _batch()
    mixup = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0).bind(CLASSES, seed=5)
    stream = np.random.default_rng(5)
    kinds, pasted_areas = [], []
    for _ in range(40):
        out, targets = mixup(images, labels)
        stream.random()
        use_cutmix = stream.random() < 0.5
        drawn = stream.beta(1.0, 1.0) if use_cutmix else stream.beta(0.4, 0.4)
        lam = _weight_of_own_label(targets, labels, 0.0)
        if use_cutmix:
            box = _box(16, 24, drawn, stream)
            np.testing.assert_array_equal(out, np.where(box, images[::-1], images))
            np.testing.assert_allclose(lam, 1.0 - box.mean(), atol=1e-6)
            pasted_areas.append(box.mean())
        else:
            np.testing.assert_allclose(lam, drawn, atol=1e-5)
            np.testing.assert_allclose(out, drawn * images + (1 - drawn) * images[::-1], atol=1e-5)
        kinds.append(use_cutmix)
    assert 10 <= sum(kinds) <= 30
    assert np.std(pasted_areas) > 0.15, pasted_areas  # Beta(1, 1) areas: uniform, not one fixed box size


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
