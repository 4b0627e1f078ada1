"""Named Conformer variants: the official configurations plus `conformer_nano` for CPU tests."""
from __future__ import annotations

from typing import Any

from conformer.models.conformer_net import Conformer

# Constructor arguments of each variant (the official `Conformer_*` functions), by name.
VARIANTS: dict[str, dict[str, Any]] = {
    "conformer_nano": dict(patch_size=16, channel_ratio=1, embed_dim=96, depth=6, num_heads=4, mlp_ratio=4,
                           qkv_bias=True),
    "conformer_ti": dict(patch_size=16, channel_ratio=1, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                         qkv_bias=True),
    "conformer_s": dict(patch_size=16, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                        qkv_bias=True),
    "conformer_s32": dict(patch_size=32, channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                          qkv_bias=True),
    "conformer_b": dict(patch_size=16, channel_ratio=6, embed_dim=576, depth=12, num_heads=9, mlp_ratio=4,
                        qkv_bias=True),
}


def model_names() -> list[str]:
    return sorted(VARIANTS)


def variant_kwargs(name: str) -> dict[str, Any]:
    """The constructor arguments of a named variant; unknown names list the choices."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    return dict(VARIANTS[name])


def create_model(name: str, **overrides: Any) -> Conformer:
    """Build a named variant; keyword arguments override its defaults (num_classes, drop_path_rate, ...)."""
    return Conformer(**{**variant_kwargs(name), **overrides})


def build_model(name: str | None = None, pretrained: str | None = None, **kwargs: Any) -> Conformer:
    """Hydra entry point (`conf/model/*.yaml`): a Conformer from explicit arguments, optionally pretrained.

    `name` only labels the variant; `pretrained` is a MindSpore `.ckpt` or official `.pth`/`.npz` weights.
    """
    model = Conformer(**kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: Conformer, path: str) -> None:
    """Load weights by file type: our own checkpoints, or the official PyTorch ones (converted on the fly)."""
    from pathlib import Path

    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no such file")
    if source.suffix == ".ckpt":
        from conformer.train.checkpoint import load_weights

        load_weights(source, model, strict=True)
    else:
        from conformer.convert import load_official_weights

        load_official_weights(model, source)
