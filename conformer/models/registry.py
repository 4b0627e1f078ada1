"""Named Conformer variants and the rules of the architecture: plain Python, no MindSpore.

Each variant is the official `Conformer_*` constructor's arguments; `conformer_nano` is the reference code's small
config, for CPU tests and the embedded default. `conf/model/<name>.yaml` names a variant and the few keys a user
overrides; any other constructor argument can be added from the command line (`+model.depth=9`). The config
checks read the architecture from here, before MindSpore is imported.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Constructor arguments of `conformer.models.conformer_net.Conformer`, with their defaults.
CONSTRUCTOR_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, in_chans=3, num_classes=1000, base_channel=64, channel_ratio=4, num_med_block=0, embed_dim=768,
    depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
    drop_path_rate=0.0, img_size=224)

VARIANTS: dict[str, dict[str, Any]] = {
    "conformer_nano": dict(patch_size=16, channel_ratio=1, embed_dim=96, depth=6, num_heads=4, mlp_ratio=4.0,
                           qkv_bias=True),
    "conformer_ti": dict(patch_size=16, channel_ratio=1, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                         qkv_bias=True),
    "conformer_s": dict(patch_size=16, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                        qkv_bias=True),
    "conformer_s32": dict(patch_size=32, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                          qkv_bias=True),
    "conformer_b": dict(patch_size=16, channel_ratio=6, embed_dim=576, depth=12, num_heads=9, mlp_ratio=4.0,
                        qkv_bias=True),
}
PATCH_SIZES = (16, 32)
# The `_target_` of a Conformer model config: the architecture checks and the weights keys apply to these; any
# other target is the user's own network (its config keys are its constructor's).
CONFORMER_TARGETS = ("conformer.models.create_model", "conformer.models.factory.create_model")


def is_conformer(model_cfg: Mapping[str, Any]) -> bool:
    return model_cfg.get("_target_") in CONFORMER_TARGETS


def model_name(model_cfg: Mapping[str, Any]) -> str:
    """What runs, tags and files call the model: `model.name`, else the class (or factory) of a custom `_target_`."""
    return str(model_cfg.get("name") or str(model_cfg.get("_target_", "model")).rpartition(".")[2])


def model_names() -> list[str]:
    return sorted(VARIANTS)


def variant_kwargs(name: str) -> dict[str, Any]:
    """The constructor arguments of a named variant; unknown names list the choices."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return dict(VARIANTS[name])


def model_arguments(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every constructor argument of variant `name` with `overrides` applied; unknown keys are a ValueError."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(CONSTRUCTOR_DEFAULTS))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a Conformer argument; choose from "
                         f"{', '.join(CONSTRUCTOR_DEFAULTS)}")
    return {**CONSTRUCTOR_DEFAULTS, **variant_kwargs(name), **overrides}


def valid_image_size(img_size: int, patch_size: int) -> bool:
    """The CNN branch and the token grid align only for positive multiples of the patch size."""
    return img_size > 0 and img_size % patch_size == 0


def nearest_image_size(img_size: int, patch_size: int) -> int:
    return max(patch_size, round(img_size / patch_size) * patch_size)


def architecture_problem(*, patch_size: int, num_classes: int, embed_dim: int, depth: int, num_heads: int,
                         drop_path_rate: float, img_size: int | None, **_: Any) -> tuple[str, str] | None:
    """The first impossible constructor argument as (name, what it must be), or None."""
    if patch_size not in PATCH_SIZES:
        return "patch_size", "16 or 32 (the official variants)"
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0 or depth % 3:
        return "depth", "a positive multiple of 3"
    if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
        return "embed_dim", f"divisible by num_heads ({num_heads})"
    if num_classes is not None and num_classes <= 0:
        return "num_classes", "positive"
    if not 0.0 <= drop_path_rate < 1.0:
        return "drop_path_rate", "in [0, 1)"
    if img_size is not None and not valid_image_size(img_size, patch_size):
        return "img_size", (f"a positive multiple of the patch size {patch_size}: the CNN branch and the token grid "
                            f"must align (e.g. {nearest_image_size(img_size, patch_size)})")
    return None


def check_architecture(**arguments: Any) -> None:
    """Raise a ValueError naming the first impossible constructor argument."""
    problem = architecture_problem(**arguments)
    if problem:
        name, what = problem
        raise ValueError(f"{name} must be {what}, got {arguments[name]!r}")
