"""`_target_` keeps its promise: `instantiate(cfg.model)` returns each configured network (its weights included),
and a user's own network with its own keys trains end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conformer.config.validation import validate_config
from conformer.errors import ConfigError
from conformer.models.checkpoint_file import read_checkpoint, save_checkpoint

from .helpers import compose_config, run_py_to_end, sqlite_uri, tiny_folder, tiny_overrides

# Parameters at 10 classes (the official constructors' counts, tests/test_model.py has the variants' at 1000).
MODELS = ("conformer_nano", "conformer_ti", "conformer_s", "conformer_s32", "conformer_b")


@pytest.mark.parametrize("model", MODELS)
def test_instantiate_builds_every_model_config(model: str) -> None:
    cfg = compose_config([f"model={model}", "data.image_size=64"])  # digits: 10 classes
    network = instantiate(cfg.model)
    assert type(network).__name__ == "Conformer"
    assert network.num_classes == cfg.data.num_classes == 10
    assert network.patch_size == (32 if model == "conformer_s32" else 16)
    assert network.conv_cls_head.weight.shape[0] == 10


def test_instantiate_loads_the_configured_weights(tmp_path: Path) -> None:
    cfg = compose_config(["model=conformer_nano", "data.image_size=32"])
    source = instantiate(cfg.model)
    weights = tmp_path / "nano.ckpt"
    save_checkpoint(source, weights)
    fresh = instantiate(cfg.model)  # another random init
    loaded = instantiate(compose_config(["model=conformer_nano", "data.image_size=32",
                                         f"model.pretrained={weights}"]).model)
    name = "trans_cls_head.weight"
    assert not np.array_equal(fresh.parameters_dict()[name].asnumpy(), source.parameters_dict()[name].asnumpy())
    for key, value in source.parameters_dict().items():
        np.testing.assert_array_equal(loaded.parameters_dict()[key].asnumpy(), value.asnumpy(), err_msg=key)


def test_an_mlflow_spec_in_python_says_how_to_resolve_it() -> None:
    cfg = compose_config(["model=conformer_nano", "data.image_size=32",
                          "model.pretrained=mlflow:0123abcd"])
    with pytest.raises(Exception, match="conformer.tracking.local_weights"):
        instantiate(cfg.model)


def _custom_model_config(base: Path, width: int) -> Path:
    conf = base / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "tiny_cnn.yaml").write_text("_target_: tests.custom_model.TinyDualHead\n"
                                        "num_classes: ${data.num_classes}\n"
                                        f"width: {width}\n")
    return conf.parent


def test_a_custom_target_is_checked_by_its_own_rules_not_the_conformers() -> None:
    cfg = compose_config(["data.image_size=20"])  # 20 px: no multiple of a patch size, and no patches here
    cfg.model = OmegaConf.create({"_target_": "tests.custom_model.TinyDualHead", "num_classes": 10, "width": 8})
    validate_config(cfg)
    assert instantiate(cfg.model).head_a.weight.shape == (10, 8)
    with pytest.raises(ConfigError, match="model._target_='MyNet' must name the network's class"):
        validate_config(compose_config(["model._target_=MyNet"]))
    with pytest.raises(ConfigError, match="data.image_size=20 must be a multiple of the patch size"):
        validate_config(compose_config(["data.image_size=20"]))


@pytest.mark.slow
def test_a_custom_model_with_its_own_keys_trains_to_a_finished_run(tmp_path: Path, tmp_path_factory) -> None:
    data = tiny_folder(tmp_path_factory.getbasetemp())
    conf = _custom_model_config(tmp_path, width=6)
    store = sqlite_uri(tmp_path / "store.db")
    overrides = [o for o in tiny_overrides(tmp_path, data) if not o.startswith("+model.")]
    result = run_py_to_end([f"--config-dir={conf}", "model=tiny_cnn", *overrides, "trainer.epochs=1",
                            f"tracking.uri={store}", "tracking.run_name=custom"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("conformer").experiment_id],
                               "attributes.run_name = 'custom'")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.width"] == "6" and run.data.tags["model"] == "TinyDualHead"
    assert 0.0 <= run.data.metrics["val/top1_sum"] <= 100.0
    last = Path(run.data.tags["run_dir"]) / "checkpoints" / "last.ckpt"
    tensors, _ = read_checkpoint(last)
    assert tuple(tensors["head_b.weight"].shape) == (3, 6) and "stem.0.weight" in tensors
