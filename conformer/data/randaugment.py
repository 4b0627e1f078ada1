"""RandAugment with timm's semantics (``rand-m9-mstd0.5-inc1``), on PIL images or HWC uint8 arrays.

MindSpore's built-in RandAugment follows torchvision (no magnitude noise, no increasing-severity op set), so
the Conformer/DeiT recipe needs this one. Behaviour follows timm's ``auto_augment.py``:

- a spec ``rand-<key><value>-...`` with keys ``n`` (ops per image, default 2), ``m`` (magnitude, default 10),
  ``mstd`` (std of the gaussian noise added to the magnitude at each op application; > 100 means uniform
  sampling in [0, m]), ``mmax`` (upper clip of the magnitude, default 10), ``inc`` (1: increasing-severity op
  set), ``w`` (0: timm's weighted op choice, without replacement) and ``p`` (per-op probability, default 0.5);
- each chosen op runs with probability ``p``; its magnitude (noisy if ``mstd`` > 0, clipped to [0, mmax]) is
  mapped to the op argument by timm's level functions, with a random sign for rotate/shear/translate and for
  the deltas of the increasing enhance ops.

Randomness: every draw comes from Python's ``random`` module only, so ``random.seed(s)`` makes a run
reproducible. MindSpore's ``dataset.config.set_seed`` seeds ``random`` in its worker processes (base seed +
worker id), and Python reseeds ``random`` after ``fork`` otherwise, so workers never share a stream.
Deviation from timm: ``inc0`` means off (timm's ``bool("0")`` turned it on) and malformed specs raise.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "INCREASING_TRANSFORMS",
    "LEVEL_DENOM",
    "OP_NAMES",
    "RAND_TRANSFORMS",
    "AugmentOp",
    "AugmentParams",
    "RandAugment",
    "RandAugmentConfig",
    "apply_op",
    "parse_config",
    "parse_hparams",
    "rand_augment_transform",
]

LEVEL_DENOM = 10.0  # magnitude M maps to the fractional level M / LEVEL_DENOM
_DEFAULT_FILL = (128, 128, 128)
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

ImageLike = Union[Image.Image, np.ndarray]
_PilOp = Callable[[Image.Image, Any, "AugmentParams"], Image.Image]  # (img, op argument, params) -> img


@dataclass(frozen=True)
class AugmentParams:
    """Image-size dependent arguments (timm's ``hparams``), validated."""

    translate_const: float = 250.0
    translate_pct: float = 0.45
    fill: tuple[int, int, int] = _DEFAULT_FILL
    interpolations: tuple[int, ...] = tuple(int(m) for m in _RANDOM_INTERPOLATION)

    def resample(self) -> int:
        """The interpolation for one geometric op: a random pick when several are allowed."""
        if len(self.interpolations) == 1:
            return self.interpolations[0]
        return random.choice(self.interpolations)


# ---------------------------------------------------------------- PIL ops: (img, arg, params) -> img
def _affine(img: Image.Image, matrix: tuple[float, ...], params: AugmentParams) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=params.resample(),
                         fillcolor=params.fill)


def _shear_x(img: Image.Image, factor: float, params: AugmentParams) -> Image.Image:
    return _affine(img, (1, factor, 0, 0, 1, 0), params)


def _shear_y(img: Image.Image, factor: float, params: AugmentParams) -> Image.Image:
    return _affine(img, (1, 0, 0, factor, 1, 0), params)


def _translate_x(img: Image.Image, pixels: float, params: AugmentParams) -> Image.Image:
    return _affine(img, (1, 0, pixels, 0, 1, 0), params)


def _translate_y(img: Image.Image, pixels: float, params: AugmentParams) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, pixels), params)


def _translate_x_rel(img: Image.Image, pct: float, params: AugmentParams) -> Image.Image:
    return _translate_x(img, pct * img.size[0], params)


def _translate_y_rel(img: Image.Image, pct: float, params: AugmentParams) -> Image.Image:
    return _translate_y(img, pct * img.size[1], params)


def _rotate(img: Image.Image, degrees: float, params: AugmentParams) -> Image.Image:
    return img.rotate(degrees, resample=params.resample(), fillcolor=params.fill)


def _auto_contrast(img: Image.Image, _arg: Any, _params: AugmentParams) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, _arg: Any, _params: AugmentParams) -> Image.Image:
    return ImageOps.equalize(img)


def _invert(img: Image.Image, _arg: Any, _params: AugmentParams) -> Image.Image:
    return ImageOps.invert(img)


def _posterize(img: Image.Image, bits: int, _params: AugmentParams) -> Image.Image:
    if bits >= 8:
        return img
    # own LUT: Pillow >= 11 rejects bits=0, which timm's levels reach at magnitude 10 (a black image)
    mask = ~(2 ** (8 - max(0, bits)) - 1) & 0xFF
    return _point(img, [i & mask for i in range(256)])


def _point(img: Image.Image, lut: list[int]) -> Image.Image:
    """Apply one 256-entry lookup table to every band."""
    return img.point(lut * len(img.getbands()))


def _solarize(img: Image.Image, threshold: int, _params: AugmentParams) -> Image.Image:
    return ImageOps.solarize(img, threshold)


def _solarize_add(img: Image.Image, add: int, _params: AugmentParams) -> Image.Image:
    return _point(img, [min(255, i + add) if i < 128 else i for i in range(256)])


def _enhancer(kind: Callable[[Image.Image], Any]) -> _PilOp:
    def enhance(img: Image.Image, factor: float, _params: AugmentParams) -> Image.Image:
        return kind(img).enhance(factor)

    enhance.__name__ = f"_{kind.__name__.lower()}"
    return enhance


# ---------------------------------------------------------------- level (magnitude) -> op argument
def _signed(value: float) -> float:
    """Flip the sign with probability 1/2 (timm's ``_randomly_negate``)."""
    return -value if random.random() > 0.5 else value


def _rotate_level(level: float, _params: AugmentParams) -> float:
    return _signed(level / LEVEL_DENOM * 30.0)


def _enhance_level(level: float, _params: AugmentParams) -> float:
    return level / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_level(level: float, _params: AugmentParams) -> float:
    # 1.0 is "no change"; the factor moves away from it towards 0.1 or 1.9 as the level grows
    return max(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9))


def _shear_level(level: float, _params: AugmentParams) -> float:
    return _signed(level / LEVEL_DENOM * 0.3)


def _translate_abs_level(level: float, params: AugmentParams) -> float:
    return _signed(level / LEVEL_DENOM * params.translate_const)


def _translate_rel_level(level: float, params: AugmentParams) -> float:
    return _signed(level / LEVEL_DENOM * params.translate_pct)


def _posterize_level(level: float, _params: AugmentParams) -> int:
    return int(level / LEVEL_DENOM * 4)  # bits kept, 0..4: severity decreases with level


def _posterize_increasing_level(level: float, params: AugmentParams) -> int:
    return 4 - _posterize_level(level, params)  # bits kept, 4..0


def _posterize_original_level(level: float, params: AugmentParams) -> int:
    return _posterize_level(level, params) + 4  # bits kept, 4..8


def _solarize_level(level: float, _params: AugmentParams) -> int:
    return min(256, int(level / LEVEL_DENOM * 256))  # threshold: severity decreases with level


def _solarize_increasing_level(level: float, params: AugmentParams) -> int:
    return 256 - _solarize_level(level, params)


def _solarize_add_level(level: float, _params: AugmentParams) -> int:
    return min(128, int(level / LEVEL_DENOM * 110))


@dataclass(frozen=True)
class _OpSpec:
    apply: _PilOp
    level: Callable[[float, AugmentParams], Any] | None  # None: the op ignores the magnitude


_color, _contrast = _enhancer(ImageEnhance.Color), _enhancer(ImageEnhance.Contrast)
_brightness, _sharpness = _enhancer(ImageEnhance.Brightness), _enhancer(ImageEnhance.Sharpness)

_OPS: dict[str, _OpSpec] = {
    "AutoContrast": _OpSpec(_auto_contrast, None),
    "Equalize": _OpSpec(_equalize, None),
    "Invert": _OpSpec(_invert, None),
    "Rotate": _OpSpec(_rotate, _rotate_level),
    "Posterize": _OpSpec(_posterize, _posterize_level),
    "PosterizeIncreasing": _OpSpec(_posterize, _posterize_increasing_level),
    "PosterizeOriginal": _OpSpec(_posterize, _posterize_original_level),
    "Solarize": _OpSpec(_solarize, _solarize_level),
    "SolarizeIncreasing": _OpSpec(_solarize, _solarize_increasing_level),
    "SolarizeAdd": _OpSpec(_solarize_add, _solarize_add_level),
    "Color": _OpSpec(_color, _enhance_level),
    "ColorIncreasing": _OpSpec(_color, _enhance_increasing_level),
    "Contrast": _OpSpec(_contrast, _enhance_level),
    "ContrastIncreasing": _OpSpec(_contrast, _enhance_increasing_level),
    "Brightness": _OpSpec(_brightness, _enhance_level),
    "BrightnessIncreasing": _OpSpec(_brightness, _enhance_increasing_level),
    "Sharpness": _OpSpec(_sharpness, _enhance_level),
    "SharpnessIncreasing": _OpSpec(_sharpness, _enhance_increasing_level),
    "ShearX": _OpSpec(_shear_x, _shear_level),
    "ShearY": _OpSpec(_shear_y, _shear_level),
    "TranslateX": _OpSpec(_translate_x, _translate_abs_level),
    "TranslateY": _OpSpec(_translate_y, _translate_abs_level),
    "TranslateXRel": _OpSpec(_translate_x_rel, _translate_rel_level),
    "TranslateYRel": _OpSpec(_translate_y_rel, _translate_rel_level),
}
OP_NAMES: tuple[str, ...] = tuple(_OPS)

RAND_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# Same order as RAND_TRANSFORMS; the colour/threshold ops get stronger (not weaker) as the magnitude grows.
INCREASING_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

# timm's weight set 0 (``w0``), keyed by base op name; increasing ops take their base op's weight.
_CHOICE_WEIGHTS = (
    {
        "Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
        "Color": 0.025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005,
        "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005, "Posterize": 0.0, "Invert": 0.0,
    },
)


# ---------------------------------------------------------------- hparams and spec parsing
_HPARAM_KEYS = ("translate_const", "translate_pct", "img_mean", "interpolation")


def _parse_interpolation(value: Any) -> tuple[int, ...]:
    items = [value] if isinstance(value, (str, int)) or not isinstance(value, Sequence) else list(value)
    if not items:
        raise ValueError("hparams['interpolation'] is empty: use 'bilinear', 'bicubic', 'nearest', 'random'")
    modes: list[int] = []
    for item in items:
        if isinstance(item, str) and item.lower() == "random":
            modes.extend(int(m) for m in _RANDOM_INTERPOLATION)
        elif isinstance(item, str) and item.lower() in _INTERPOLATIONS:
            modes.append(int(_INTERPOLATIONS[item.lower()]))
        elif isinstance(item, int) and not isinstance(item, bool) and item in _INTERPOLATIONS.values():
            modes.append(int(item))
        else:
            raise ValueError(f"hparams['interpolation']={item!r} is not supported by PIL affine transforms: "
                             f"use one of {sorted(_INTERPOLATIONS)}, 'random', or a list of them")
    return tuple(dict.fromkeys(modes))


def _parse_fill(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"hparams['img_mean']={value!r} must be 3 channel values in [0, 255] (R, G, B)")
    fill = tuple(int(round(float(v))) for v in value)
    if any(not 0 <= v <= 255 for v in fill):
        raise ValueError(f"hparams['img_mean']={value!r} must be 3 channel values in [0, 255]")
    return fill  # type: ignore[return-value]


def parse_hparams(hparams: Mapping[str, Any] | None) -> AugmentParams:
    """Validate timm-style ``hparams`` (keys: ``translate_const``, ``translate_pct``, ``img_mean``,
    ``interpolation``)."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(_HPARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown RandAugment hparams {unknown}; valid keys: {list(_HPARAM_KEYS)}")
    kwargs: dict[str, Any] = {}
    for key in ("translate_const", "translate_pct"):
        if key in hparams:
            value = hparams[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"hparams[{key!r}]={value!r} must be a number >= 0")
            kwargs[key] = float(value)
    if "img_mean" in hparams:
        kwargs["fill"] = _parse_fill(hparams["img_mean"])
    if "interpolation" in hparams:
        kwargs["interpolations"] = _parse_interpolation(hparams["interpolation"])
    return AugmentParams(**kwargs)


@dataclass(frozen=True)
class RandAugmentConfig:
    """The fields of a ``rand-...`` spec, with timm's defaults."""

    num_layers: int = 2
    magnitude: int = 10
    magnitude_std: float = 0.0  # inf: uniform sampling in [0, magnitude]
    magnitude_max: int = 10
    increasing: bool = False
    prob: float = 0.5
    weight_idx: int | None = None

    @property
    def transforms(self) -> tuple[str, ...]:
        return INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


_SPEC_HELP = ("a RandAugment spec is 'rand' followed by '-'-separated <key><number> sections, e.g. "
              "'rand-m9-mstd0.5-inc1'; keys: n (ops per image, int >= 0), m (magnitude, int >= 0), "
              "mstd (magnitude noise std, float >= 0, > 100 = uniform), mmax (magnitude clip, int > 0), "
              "inc (0/1 increasing-severity ops), w (op weight set: 0), p (per-op probability in [0, 1])")


def _spec_number(key: str, text: str, spec: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"RandAugment spec {spec!r}: '{key}{text}' needs {kind.__name__} value; "
                         f"{_SPEC_HELP}") from None


def parse_config(config_str: str) -> RandAugmentConfig:
    """Parse a timm RandAugment spec such as ``rand-m9-mstd0.5-inc1``; raises ValueError when malformed."""
    if not isinstance(config_str, str):
        raise ValueError(f"RandAugment spec must be a string, got {type(config_str).__name__}; {_SPEC_HELP}")
    head, *sections = config_str.split("-")
    if head != "rand":
        raise ValueError(f"RandAugment spec {config_str!r} must start with 'rand'; {_SPEC_HELP}")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for section in sections:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(f"RandAugment spec {config_str!r}: bad section {section!r}; {_SPEC_HELP}")
        key, text = match.groups()
        if key in seen:
            raise ValueError(f"RandAugment spec {config_str!r} sets {key!r} twice")
        seen.add(key)
        if key == "n":
            fields["num_layers"] = _spec_number(key, text, config_str, int)
        elif key == "m":
            fields["magnitude"] = _spec_number(key, text, config_str, int)
        elif key == "mstd":
            std = _spec_number(key, text, config_str, float)
            fields["magnitude_std"] = float("inf") if std > 100 else std
        elif key == "mmax":
            fields["magnitude_max"] = _spec_number(key, text, config_str, int)
        elif key == "inc":
            flag = _spec_number(key, text, config_str, int)
            if flag not in (0, 1):
                raise ValueError(f"RandAugment spec {config_str!r}: inc must be 0 or 1, got {flag}")
            fields["increasing"] = bool(flag)
        elif key == "w":
            fields["weight_idx"] = _spec_number(key, text, config_str, int)
        elif key == "p":
            fields["prob"] = _spec_number(key, text, config_str, float)
        else:
            raise ValueError(f"RandAugment spec {config_str!r}: unknown key {key!r}; {_SPEC_HELP}")
    config = RandAugmentConfig(**fields)
    _check_config(config, config_str)
    return config


def _check_config(config: RandAugmentConfig, spec: str) -> None:
    if config.magnitude_max <= 0:
        raise ValueError(f"RandAugment spec {spec!r}: mmax must be > 0, got {config.magnitude_max}")
    if not 0.0 <= config.prob <= 1.0:
        raise ValueError(f"RandAugment spec {spec!r}: p must be in [0, 1], got {config.prob}")
    if config.weight_idx is not None:
        if not 0 <= config.weight_idx < len(_CHOICE_WEIGHTS):
            raise ValueError(f"RandAugment spec {spec!r}: w{config.weight_idx} unknown; only w0 exists")
        usable = sum(w > 0 for w in _choice_weights(config))
        if config.num_layers > usable:
            raise ValueError(f"RandAugment spec {spec!r}: weighted choice (w) draws without replacement, "
                             f"so n must be <= {usable}, got {config.num_layers}")


def _choice_weights(config: RandAugmentConfig) -> list[float] | None:
    if config.weight_idx is None:
        return None
    weights = _CHOICE_WEIGHTS[config.weight_idx]
    return [weights[name.removesuffix("Increasing")] for name in config.transforms]


# ---------------------------------------------------------------- image type handling
def _to_pil(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"RandAugment needs an RGB image, got mode {img.mode!r}: use img.convert('RGB')")
        return img
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"RandAugment needs an HWC uint8 array with 3 channels, got shape {img.shape} "
                             f"dtype {img.dtype}: decode to uint8 RGB before augmenting")
        return Image.fromarray(img)
    raise TypeError(f"RandAugment takes a PIL.Image or a numpy array, got {type(img).__name__}")


def _like(out: Image.Image, original: ImageLike) -> ImageLike:
    return np.array(out) if isinstance(original, np.ndarray) else out


def _apply_pil(img: Image.Image, name: str, magnitude: float, params: AugmentParams) -> Image.Image:
    spec = _OPS[name]
    arg = spec.level(magnitude, params) if spec.level is not None else None
    return spec.apply(img, arg, params)


def _check_op_name(name: str) -> None:
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; valid ops: {list(OP_NAMES)}")


def apply_op(
    img: ImageLike, name: str, magnitude: float, hparams: Mapping[str, Any] | None = None
) -> ImageLike:
    """Apply op ``name`` once at exactly ``magnitude`` (no probability, no noise, no clipping).

    Signs (rotate, shear, translate, increasing enhance) and the interpolation are still drawn from
    ``random``.
    """
    _check_op_name(name)
    if magnitude < 0:
        raise ValueError(f"magnitude must be >= 0, got {magnitude}")
    return _like(_apply_pil(_to_pil(img), name, magnitude, parse_hparams(hparams)), img)


# ---------------------------------------------------------------- transforms
class AugmentOp:
    """One RandAugment op: applied with probability ``prob`` at a (noisy, clipped) magnitude."""

    def __init__(self, name: str, prob: float = 0.5, magnitude: float = 10, magnitude_std: float = 0.0,
                 magnitude_max: float = LEVEL_DENOM, params: AugmentParams | None = None) -> None:
        _check_op_name(name)
        self.name = name
        self.prob = prob
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.params = params or AugmentParams()

    def sample_magnitude(self) -> float:
        """The magnitude for one application: noisy when ``magnitude_std`` > 0, clipped to [0, mmax]."""
        magnitude = float(self.magnitude)
        if self.magnitude_std == float("inf"):
            magnitude = random.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = random.gauss(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, float(self.magnitude_max)))

    def apply_pil(self, img: Image.Image) -> Image.Image:
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        return _apply_pil(img, self.name, self.sample_magnitude(), self.params)

    def __call__(self, img: ImageLike) -> ImageLike:
        return _like(self.apply_pil(_to_pil(img)), img)

    def __repr__(self) -> str:
        return (f"AugmentOp(name={self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std}, "
                f"mmax={self.magnitude_max})")


class RandAugment:
    """Pick ``num_layers`` ops per image (uniform with replacement, or weighted without) and apply them."""

    def __init__(self, config: RandAugmentConfig, params: AugmentParams | None = None) -> None:
        self.config = config
        self.params = params or AugmentParams()
        self.ops = [
            AugmentOp(name, config.prob, config.magnitude, config.magnitude_std, config.magnitude_max,
                      self.params)
            for name in config.transforms
        ]
        self.choice_weights = _choice_weights(config)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def choose_ops(self) -> list[AugmentOp]:
        """The ops for one image, drawn from ``random``."""
        if self.choice_weights is None:
            return [random.choice(self.ops) for _ in range(self.num_layers)]
        pool, weights, chosen = list(self.ops), list(self.choice_weights), []
        for _ in range(self.num_layers):
            index = random.choices(range(len(pool)), weights=weights)[0]
            chosen.append(pool.pop(index))
            weights.pop(index)
        return chosen

    def __call__(self, img: ImageLike) -> ImageLike:
        out = _to_pil(img)
        for op in self.choose_ops():
            out = op.apply_pil(out)
        return _like(out, img)

    def __repr__(self) -> str:
        ops = ", ".join(op.name for op in self.ops)
        return f"RandAugment({self.config}, ops=[{ops}])"


def rand_augment_transform(config_str: str, hparams: Mapping[str, Any] | None = None) -> RandAugment:
    """Build a RandAugment from a timm spec (e.g. ``rand-m9-mstd0.5-inc1``) and timm-style ``hparams``.

    ``hparams``: ``translate_const`` (pixels, for TranslateX/Y; timm passes ``int(img_size * 0.45)``),
    ``translate_pct`` (for TranslateXRel/YRel, default 0.45), ``img_mean`` (fill colour, 3 ints, default
    128s), ``interpolation`` ('bilinear' | 'bicubic' | 'nearest' | 'random' or a list; default random
    bilinear/bicubic). Input is never mutated (timm's version writes into it).
    """
    return RandAugment(parse_config(config_str), parse_hparams(hparams))
