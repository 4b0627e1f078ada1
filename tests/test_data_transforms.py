"""Train/eval transforms (real MindSpore ops on real JPEG/PNG bytes) and random erasing statistics."""
from __future__ import annotations

import io
import random

import mindspore.dataset as ds
import mindspore.dataset.vision as vision
import numpy as np
import pytest
from PIL import Image

from conformer.data.erasing import RandomErasing
from conformer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    center_crop_offset,
    shorter_side_size,
)

MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth but asymmetric RGB image (so crops, flips and resizes are all visible)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BICUBIC))


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _apply(ops: list, image: np.ndarray) -> np.ndarray:
    for op in ops:
        image = op(image)
    return np.asarray(image)


def _pipeline(ops: list, data: np.ndarray, copies: int) -> np.ndarray:
    """``copies`` passes of ``data`` through a real pipeline (seeded eager random ops repeat themselves)."""
    dataset = ds.NumpySlicesDataset({"image": np.stack([data] * copies)}, shuffle=False).map(ops, "image")
    return np.stack([row[0] for row in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)])


def _normalise(pixels: np.ndarray) -> np.ndarray:
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 255.0 - MEAN) / STD


def test_eval_resizes_shorter_side_then_center_crops_like_pil() -> None:
    pixels = _pattern(60, 40)  # width 60, height 40
    transform = EvalTransform(32, crop_pct=0.875)
    assert transform.resize_size == 36
    out = _apply(transform.operations(decode=True), _encode(pixels))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32

    resized = Image.fromarray(pixels).resize((54, 36), Image.BICUBIC)  # shorter side 40 -> 36
    left, top = (54 - 32) // 2, (36 - 32) // 2
    expected = _normalise(np.asarray(resized.crop((left, top, left + 32, top + 32))))
    np.testing.assert_allclose(out, expected, atol=2.5 / 255 / min(IMAGENET_STD))


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-sized image with per-pixel detail: any one-pixel shift of a crop changes it."""
    noise = np.random.default_rng(seed + 1).integers(-40, 41, (height, width, 3))
    return np.clip(_pattern(width, height, seed).astype(np.int64) + noise, 0, 255).astype(np.uint8)


# (width, height, image_size, crop_pct, torchvision's resized (width, height), crop (left, top)), by hand from
# torchvision: Resize(int(image_size / crop_pct)) gives the shorter side that size and the longer
# int(size * long / short); CenterCrop starts at int(round((L - image_size) / 2)), round half to even.
TORCHVISION_EVAL_CASES = [
    (640, 427, 224, 0.875, (383, 256), (80, 16)),  # 256 * 640 / 427 = 383.7; (383 - 224) / 2 = 79.5 -> 80
    (427, 640, 224, 0.875, (256, 383), (16, 80)),  # the same, transposed
    (636, 427, 224, 0.875, (381, 256), (78, 16)),  # 256 * 636 / 427 = 381.3; 78.5 -> 78 (half to even)
    (494, 470, 224, 0.95, (247, 235), (12, 6)),  # 235 * 494 / 470 = 247 exactly; 11.5 -> 12, 5.5 -> 6
]


@pytest.mark.parametrize(("width", "height", "image_size", "crop_pct", "resized", "corner"), TORCHVISION_EVAL_CASES)
def test_eval_matches_torchvision_resize_and_center_crop_exactly(width: int, height: int, image_size: int,
                                                                 crop_pct: float, resized: tuple[int, int],
                                                                 corner: tuple[int, int]) -> None:
    pixels = _photo(width, height)
    transform = EvalTransform(image_size, crop_pct=crop_pct)
    left, top = corner
    crop = Image.fromarray(pixels).resize(resized, Image.BICUBIC).crop(
        (left, top, left + image_size, top + image_size))
    expected_pixels = np.asarray(crop)
    normalise = transform.operations(decode=False)[1:]  # the transform's own normalisation after the crop
    expected = _apply(normalise, expected_pixels)
    raw = _encode(pixels)
    out = _apply(transform.operations(decode=True), raw)
    assert out.shape == (3, image_size, image_size) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(_apply(transform.operations(decode=False), pixels), expected)
    np.testing.assert_array_equal(_pipeline(transform.operations(), raw, 2), np.stack([expected] * 2))


@pytest.mark.parametrize(("width", "height", "image_size", "crop_pct", "resized", "corner"),
                         [TORCHVISION_EVAL_CASES[0], TORCHVISION_EVAL_CASES[3]])
def test_mindspore_resize_and_center_crop_are_a_pixel_off(width: int, height: int, image_size: int,
                                                          crop_pct: float, resized: tuple[int, int],
                                                          corner: tuple[int, int]) -> None:
    """What the eval transform replaces: MindSpore's Resize(int) + CenterCrop cut these a pixel away."""
    pixels = _photo(width, height)
    resize_size = EvalTransform(image_size, crop_pct=crop_pct).resize_size
    ours = vision.CenterCrop(image_size)(vision.Resize(resize_size, vision.Inter.PILCUBIC)(pixels))
    left, top = corner
    torchvision = Image.fromarray(pixels).resize(resized, Image.BICUBIC).crop(
        (left, top, left + image_size, top + image_size))
    assert not np.array_equal(ours, np.asarray(torchvision))


def test_torchvision_size_and_offset_helpers() -> None:
    assert shorter_side_size(427, 640, 256) == (256, 383) and shorter_side_size(640, 427, 256) == (383, 256)
    assert shorter_side_size(470, 494, 235) == (235, 247) and shorter_side_size(300, 300, 256) == (256, 256)
    assert [center_crop_offset(length, 224) for length in (224, 225, 226, 227, 381, 383, 385)] == [
        0, 0, 1, 2, 78, 80, 80]  # (L - 224) / 2 = 0, 0.5, 1, 1.5, 78.5, 79.5, 80.5: halves go to the even side


def test_train_crop_flip_matches_pil_reference_when_deterministic() -> None:
    pixels = _pattern(48, 36)
    ratio = 48 / 36
    transform = TrainTransform(32, scale=(1.0, 1.0), ratio=(ratio, ratio), hflip=1.0)
    expected = _normalise(np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BICUBIC))[:, ::-1])
    for decode, data in ((True, _encode(pixels)), (False, pixels)):
        out = _apply(transform.operations(decode=decode), data)
        assert out.shape == (3, 32, 32) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_train_output_range_and_randomness() -> None:
    transform = TrainTransform(32, auto_augment=None, re_prob=0.0)
    raw = _encode(_pattern(64, 48), "JPEG")
    outs = _pipeline(transform.operations(), raw, 8)
    assert outs.shape == (8, 3, 32, 32) and outs.dtype == np.float32
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert np.all(outs >= lo - 1e-5) and np.all(outs <= hi + 1e-5)
    assert len({o.tobytes() for o in outs}) > 4  # random crops differ


def test_rand_augment_is_wired_with_timm_hparams() -> None:
    transform = TrainTransform(224, auto_augment="rand-m9-mstd0.5-inc1", mean=(0.5, 0.25, 1.0))
    stages = transform.stages()
    assert [stage.processes for stage in stages] == [False, True, False]  # only RandAugment crosses processes
    (augment,) = stages[1].ops
    assert type(augment).__name__ == "RandAugment" and transform.operations()[2] is augment
    assert augment.params.translate_const == int(224 * 0.45)
    assert augment.params.fill == (128, 64, 255)
    random.seed(0)
    small = TrainTransform(32, auto_augment="rand-m9-mstd0.5-inc1", hflip=0.0, scale=(1.0, 1.0), ratio=(1, 1))
    plain = TrainTransform(32, hflip=0.0, scale=(1.0, 1.0), ratio=(1, 1))
    raw = _encode(_pattern(40, 40))
    reference = _apply(plain.operations(), raw)
    augmented = list(_pipeline(small.operations(), raw, 6))
    assert all(a.shape == (3, 32, 32) and a.dtype == np.float32 for a in augmented)
    assert sum(not np.allclose(a, reference) for a in augmented) >= 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 32, "interpolation": "lanczos"}, "interpolation"),
        ({"image_size": 32, "scale": (0.5, 2.0)}, "scale"),
        ({"image_size": 32, "hflip": 1.5}, "hflip"),
        ({"image_size": 32, "auto_augment": "v0"}, "RandAugment"),
        ({"image_size": 32, "re_prob": 0.5, "re_mode": "noise"}, "mode"),
        ({"image_size": 32, "re_prob": -0.1}, "re_prob"),
        ({"image_size": 32, "mean": (0.5, 0.5)}, "mean"),
    ],
)
def test_train_transform_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainTransform(**kwargs)


def test_eval_transform_rejects_bad_crop_pct() -> None:
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(32, crop_pct=1.5)


def test_erasing_rate_area_and_pixel_noise() -> None:
    random.seed(1)
    erase = RandomErasing(0.25, mode="pixel")
    images = [np.full((3, 40, 40), 7.0, np.float32) for _ in range(600)]
    outs = [erase(img) for img in images]
    touched = [o for o in outs if not np.all(o == 7.0)]
    assert 0.19 < len(touched) / len(outs) < 0.31  # binomial(600, 0.25): +-4.3 sigma
    assert all(np.all(img == 7.0) for img in images)  # inputs are not modified
    fractions = np.array([np.mean(o[0] != 7.0) for o in touched])
    assert fractions.min() > 0.01 and fractions.max() < 0.4  # one box of 2%..33% of the area, h, w rounded
    values = touched[0][touched[0] != 7.0]
    assert values.std() > 0.5 and len(np.unique(values)) > 0.9 * values.size  # per-pixel N(0, 1) noise
    same_box_all_channels = [np.array_equal(o[0] != 7.0, o[2] != 7.0) for o in touched]
    assert all(same_box_all_channels)


def test_erasing_modes_and_counts() -> None:
    random.seed(2)
    const = RandomErasing(1.0, mode="const")(np.ones((3, 30, 30), np.float32))
    assert set(np.unique(const)) == {0.0, 1.0}
    rand = RandomErasing(1.0, mode="rand")(np.full((3, 30, 30), 9.0, np.float32))
    for channel in rand:
        assert len(np.unique(channel[channel != 9.0])) == 1  # one value per channel
    boxes = RandomErasing(1.0, mode="const", min_count=3, max_count=3, max_area=0.05)
    mask = boxes(np.ones((1, 60, 60), np.float32))[0] == 0.0
    assert 3 * 0.02 / 3 <= mask.mean() <= 0.05 + 1e-9
