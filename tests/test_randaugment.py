"""timm-semantics RandAugment: op levels, spec parsing, magnitude noise, reproducibility, input types."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from PIL import Image

from conformer.data.randaugment import (
    INCREASING_TRANSFORMS,
    OP_NAMES,
    RAND_TRANSFORMS,
    AugmentOp,
    RandAugment,
    apply_op,
    parse_config,
    rand_augment_transform,
)

MAGNITUDE_FREE = ("AutoContrast", "Equalize", "Invert")
MAGNITUDE_DRIVEN = tuple(name for name in OP_NAMES if name not in MAGNITUDE_FREE)
# timm's PosterizeIncreasing keeps 4 bits at magnitude 0, so it is the one increasing op that is not identity
ZERO_IS_IDENTITY = tuple(n for n in MAGNITUDE_DRIVEN if n in INCREASING_TRANSFORMS and "Posterize" not in n)


def _textured(size: int = 48, low: int = 0, high: int = 255, seed: int = 0) -> Image.Image:
    """Diagonal colour gradients plus noise, spanning [low, high]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 0.75 + rng.random((size, size, 3)) * 0.25
    return Image.fromarray((low + base * (high - low)).round().astype(np.uint8))


@pytest.fixture(scope="module")
def img() -> Image.Image:
    return _textured()


def _arr(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _change(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_arr(a) - _arr(b)).mean())


@pytest.mark.parametrize("name", ZERO_IS_IDENTITY)
def test_increasing_op_at_magnitude_zero_is_identity(img: Image.Image, name: str) -> None:
    for seed in range(4):  # both signs and both interpolations
        random.seed(seed)
        assert np.array_equal(_arr(apply_op(img, name, 0)), _arr(img)), (name, seed)


def test_posterize_increasing_keeps_four_bits_at_zero_and_none_at_ten(img: Image.Image) -> None:
    # timm: bits kept = 4 - int(m / 10 * 4), so magnitude 0 is not identity but a 4-bit posterize
    assert np.array_equal(_arr(apply_op(img, "PosterizeIncreasing", 0)), _arr(img) & 0xF0)
    assert np.array_equal(_arr(apply_op(img, "PosterizeIncreasing", 5)), _arr(img) & 0xC0)
    assert _arr(apply_op(img, "PosterizeIncreasing", 10)).max() == 0


def test_invert_is_an_involution(img: Image.Image) -> None:
    once = apply_op(img, "Invert", 7)
    assert np.array_equal(_arr(once), 255 - _arr(img))
    assert np.array_equal(_arr(apply_op(once, "Invert", 0)), _arr(img))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize"])
def test_contrast_ops_stretch_range_with_monotone_mapping(name: str) -> None:
    dull = _textured(low=60, high=180)
    out = _arr(apply_op(dull, name, 3))
    src = _arr(dull)
    assert np.array_equal(out, _arr(apply_op(dull, name, 9))), "magnitude must not matter"
    for c in range(3):
        assert out[..., c].min() <= 5 and out[..., c].max() >= 250  # input spans [60, 180]
        order = np.argsort(src[..., c].ravel(), kind="stable")
        assert np.all(np.diff(out[..., c].ravel()[order]) >= 0), "per-channel mapping must be monotone"
    if name == "AutoContrast":
        assert out[..., 0].min() == 0


@pytest.mark.parametrize("name", MAGNITUDE_DRIVEN)
def test_every_magnitude_driven_op_changes_image_at_nine(img: Image.Image, name: str) -> None:
    for seed in range(2):
        random.seed(seed)
        assert _change(apply_op(img, name, 9), img) > 0.5, (name, seed)


@pytest.mark.parametrize(
    "name",
    ["Rotate", "ShearX", "ShearY", "TranslateXRel", "PosterizeIncreasing", "SolarizeIncreasing",
     "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"],
)
def test_severity_grows_with_magnitude(img: Image.Image, name: str) -> None:
    for seed in range(3):  # same seed at both magnitudes: same sign and interpolation
        random.seed(seed)
        weak = _change(apply_op(img, name, 3), img)
        random.seed(seed)
        strong = _change(apply_op(img, name, 9), img)
        assert 0 < weak < strong, (name, seed, weak, strong)


def test_translate_uses_hparams_pixels_fill_and_interpolation(img: Image.Image) -> None:
    fill = (7, 200, 31)
    hparams = {"translate_const": 10, "img_mean": fill, "interpolation": "nearest"}
    src = _arr(img)
    for seed in range(4):
        random.seed(seed)
        out = _arr(apply_op(img, "TranslateX", 10, hparams))
        left = np.array_equal(out[:, :38], src[:, 10:]) and np.all(out[:, 38:] == fill)
        right = np.array_equal(out[:, 10:], src[:, :38]) and np.all(out[:, :10] == fill)
        assert left != right, seed
    random.seed(0)
    rotated = _arr(apply_op(img, "Rotate", 9, {"interpolation": "nearest", "img_mean": fill}))
    known = {tuple(p) for p in src.reshape(-1, 3)} | {fill}
    assert {tuple(p) for p in rotated.reshape(-1, 3)} <= known, "nearest rotation must only copy pixels"


def test_parser_fields_and_defaults() -> None:
    cfg = parse_config("rand-m9-mstd0.5-inc1")
    fields = (cfg.num_layers, cfg.magnitude, cfg.magnitude_std, cfg.magnitude_max, cfg.increasing, cfg.prob)
    assert fields == (2, 9, 0.5, 10, True, 0.5)
    assert cfg.transforms == INCREASING_TRANSFORMS and cfg.weight_idx is None
    cfg = parse_config("rand-n3-m12-mstd101-mmax15-inc0-w0-p0.8")
    assert (cfg.num_layers, cfg.magnitude, cfg.magnitude_std, cfg.magnitude_max, cfg.increasing, cfg.prob,
            cfg.weight_idx) == (3, 12, float("inf"), 15, False, 0.8, 0)
    assert cfg.transforms == RAND_TRANSFORMS
    bare = parse_config("rand")
    assert (bare.num_layers, bare.magnitude, bare.magnitude_std, bare.increasing) == (2, 10, 0.0, False)
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1")
    assert [op.name for op in ra.ops] == list(INCREASING_TRANSFORMS)
    assert all((op.magnitude, op.magnitude_std, op.prob) == (9, 0.5, 0.5) for op in ra.ops)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("augmix-m9", "must start with 'rand'"),
        ("randm9", "must start with 'rand'"),
        ("rand-x3", "unknown key 'x'"),
        ("rand-m", "bad section 'm'"),
        ("rand--m9", "bad section ''"),
        ("rand-m9.5", "needs int"),
        ("rand-mstdabc", "bad section"),
        ("rand-m9-m8", "twice"),
        ("rand-inc2", "inc must be 0 or 1"),
        ("rand-p1.5", r"p must be in \[0, 1\]"),
        ("rand-mmax0", "mmax must be > 0"),
        ("rand-w1", "only w0"),
        ("rand-w0-n14", "n must be <= 13"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rand_augment_transform(spec)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"translate": 0.3}, "unknown RandAugment hparams"),
        ({"img_mean": (1, 2)}, "3 channel values"),
        ({"img_mean": (1, 2, 300)}, r"\[0, 255\]"),
        ({"interpolation": "lanczos"}, "not supported"),
        ({"translate_const": -1}, ">= 0"),
    ],
)
def test_bad_hparams_raise_clear_errors(hparams: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rand_augment_transform("rand-m9", hparams)


def test_bad_inputs_raise_clear_errors(img: Image.Image) -> None:
    ra = rand_augment_transform("rand-m9")
    with pytest.raises(ValueError, match="RGB"):
        ra(img.convert("L"))
    with pytest.raises(ValueError, match="HWC uint8"):
        ra(np.zeros((3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="HWC uint8"):
        ra(np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="PIL.Image or a numpy array"):
        ra([[0, 0, 0]])
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op(img, "Cutout", 5)


def test_magnitude_noise_varies_and_stays_clipped() -> None:
    random.seed(0)
    noisy = AugmentOp("Rotate", magnitude=9, magnitude_std=0.5)
    draws = np.array([noisy.sample_magnitude() for _ in range(2000)])
    assert len(np.unique(draws)) > 1000
    assert draws.min() >= 0.0 and draws.max() == 10.0  # gauss(9, 0.5) exceeds 10 ~2% of the time: clipped
    assert abs(draws.mean() - 9.0) < 0.1 and 0.35 < draws.std() < 0.55
    uniform = AugmentOp("Rotate", magnitude=8, magnitude_std=float("inf"))
    draws = np.array([uniform.sample_magnitude() for _ in range(2000)])
    assert draws.min() < 0.1 and 7.9 < draws.max() <= 8.0 and abs(draws.mean() - 4.0) < 0.25
    assert AugmentOp("Rotate", magnitude=9).sample_magnitude() == 9.0
    assert AugmentOp("Rotate", magnitude=12).sample_magnitude() == 10.0
    assert AugmentOp("Rotate", magnitude=12, magnitude_max=15).sample_magnitude() == 12.0
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1")
    assert {ra.ops[3].sample_magnitude() for _ in range(10)} != {9.0}


def test_fixed_seed_reproduces_outputs_and_other_seeds_differ(img: Image.Image) -> None:
    def run(seed: int) -> list[np.ndarray]:
        random.seed(seed)
        ra = rand_augment_transform("rand-m9-mstd0.5-inc1")
        return [_arr(ra(img)) for _ in range(12)]

    first, second, other = run(3), run(3), run(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    assert any(_change(out, img) > 0 for out in first), "some calls must augment"


def test_numpy_input_gives_numpy_output_matching_pil_path(img: Image.Image) -> None:
    ra = rand_augment_transform("rand-n3-m9-mstd0.5-inc1-p1", {"interpolation": "bicubic"})
    src = np.asarray(img).copy()
    for seed in range(5):
        random.seed(seed)
        out = ra(src)
        random.seed(seed)
        ref = ra(img)
        assert isinstance(out, np.ndarray) and out.shape == src.shape and out.dtype == np.uint8
        assert isinstance(ref, Image.Image) and ref.size == img.size and ref.mode == "RGB"
        assert np.array_equal(out, np.asarray(ref))
    assert np.array_equal(src, np.asarray(img)), "input must not be modified"


def test_weighted_choice_is_without_replacement_and_skips_zero_weights() -> None:
    random.seed(0)
    ra = rand_augment_transform("rand-n4-m9-w0-inc1")
    counts: dict[str, int] = {}
    for _ in range(300):
        names = [op.name for op in ra.choose_ops()]
        assert len(set(names)) == 4
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    assert "Invert" not in counts and "PosterizeIncreasing" not in counts
    assert counts["Rotate"] > counts["ColorIncreasing"]


def test_pickle_roundtrip_keeps_behaviour(img: Image.Image) -> None:
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104), "translate_const": 21})
    clone = pickle.loads(pickle.dumps(ra))
    assert isinstance(clone, RandAugment) and clone.config == ra.config and clone.params == ra.params
    for seed in range(4):
        random.seed(seed)
        a = _arr(ra(img))
        random.seed(seed)
        assert np.array_equal(a, _arr(clone(img)))


def test_runs_as_mindspore_map_operation(img: Image.Image) -> None:
    import mindspore.dataset as ds

    images = [np.asarray(_textured(32, seed=s)) for s in range(6)]
    data = ds.NumpySlicesDataset({"image": np.stack(images)}, shuffle=False)
    data = data.map(operations=[rand_augment_transform("rand-m9-mstd0.5-inc1-p1")], input_columns="image")
    outs = [row["image"] for row in data.create_dict_iterator(output_numpy=True, num_epochs=1)]
    assert len(outs) == 6 and all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, i) for o, i in zip(outs, images))
