"""`create_model`: a named Conformer variant, with its weights when asked (timm's `create_model(name, pretrained=)`).

The Hydra target of `conf/model/*.yaml`, so `hydra.utils.instantiate(cfg.model)` returns the configured network,
weights included. `pretrained` is a weights file: our `.ckpt` or the official `.pth`/`.npz`. An `mlflow:<run_id>`
spec needs the tracking store, which run.py knows: there it arrives here as the file it resolved to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from conformer.models.conformer_net import Conformer
from conformer.models.registry import model_arguments
from conformer.models.weights import load_into
from conformer.vocabulary import MLFLOW_PREFIX


def create_model(name: str, pretrained: str | Path | None = None, pretrained_strict: bool = False,
                 **overrides: Any) -> Conformer:
    """Variant `name` (conformer.models.registry) with `overrides` of its constructor arguments (num_classes,
    img_size, drop_path_rate, ...), and the weights of `pretrained` loaded. With `pretrained_strict` false, weights
    of another class count leave the classifier heads fresh (fine-tuning); true refuses them."""
    network = Conformer(**model_arguments(name, overrides))
    if pretrained:
        if str(pretrained).startswith(MLFLOW_PREFIX):
            raise ValueError(f"pretrained={pretrained}: an MLflow run's weights are found through the tracking store; "
                             "in Python, pass the file `conformer.tracking.local_weights(spec, cfg.tracking, "
                             "project_root)` returns")
        load_into(network, Path(str(pretrained)).expanduser(), fine_tune=not pretrained_strict)
    return network
