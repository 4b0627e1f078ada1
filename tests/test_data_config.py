"""conf/data/*.yaml instantiate into working DataModules (interpolations, recipe values, overrides)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from conformer.config.validation import validate_config
from conformer.data.generated import SyntheticSource, write_image_folder
from conformer.data.module import DataModule
from conformer.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def _config(name: str, tmp_path: Path, **data_overrides) -> DictConfig:
    """The data group under a root with the keys it interpolates (seed, paths.*, loss.label_smoothing)."""
    paths = {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")}
    root = OmegaConf.create({"seed": 5, "paths": paths, "loss": {"label_smoothing": 0.1},
                             "data": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in data_overrides.items():
        OmegaConf.update(root, f"data.{key}", value, force_add=False)
    return root


def _first_batch(module: DataModule) -> tuple[np.ndarray, np.ndarray]:
    return next(module.train_loader().create_tuple_iterator(num_epochs=1, output_numpy=True))


def test_every_component_has_a_target() -> None:
    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert cfg["_target_"] == "conformer.data.module.DataModule", path.name
        for key in ("source", "train_transform", "eval_transform"):
            assert "_target_" in cfg[key], f"{path.name}: {key}"
        for key in ("train_transform", "eval_transform"):
            assert cfg[key]["image_size"] == "${data.image_size}", f"{path.name}: {key}"
    assert {p.stem for p in CONF.glob("*.yaml")} >= {"digits", "imagenet", "folder", "synthetic"}


def test_digits_config_materialises_and_trains(tmp_path: Path) -> None:
    module = instantiate(_config("digits", tmp_path).data)
    assert (module.num_classes, module.train_size, module.val_size, module.image_size) == (10, 1437, 360, 32)
    assert (tmp_path / "cache" / "digits" / "train").is_dir()
    assert module.mixup is None and module.train_transform.hflip == 0.0 and module.on_bad_image == "skip"
    images, labels = _first_batch(module)
    assert images.shape == (64, 3, 32, 32) and labels.dtype == np.int32


def test_imagenet_recipe(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data" / "imagenet", num_classes=3, train_per_class=4, val_per_class=1,
                       size=(40, 30))
    cfg = _config("imagenet", tmp_path)
    with pytest.raises(InstantiationException, match="num_classes=1000 but .* has 3 classes"):
        instantiate(cfg.data)
    cfg = _config("imagenet", tmp_path, num_classes=None, image_size=32, batch_size=4)
    module = instantiate(cfg.data)
    train = module.train_transform
    assert (train.interpolation, train.hflip, train.auto_augment) == ("bicubic", 0.5, "rand-m9-mstd0.5-inc1")
    assert (train.erasing.probability, train.erasing.mode, train.erasing.max_count) == (0.25, "pixel", 1)
    mixup = module.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (mixup.label_smoothing, mixup.num_classes, module.seed) == (0.1, 3, 5)
    assert module.eval_transform.resize_size == int(32 / 0.875)
    images, targets = _first_batch(module)
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 3) and targets.dtype == np.float32


def test_folder_config_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(MissingMandatoryValue):
        instantiate(_config("folder", tmp_path).data)
    root = write_image_folder(tmp_path / "mine", num_classes=2, train_per_class=4, val_per_class=1)
    module = instantiate(_config("folder", tmp_path, **{"source.root": str(root), "image_size": 32,
                                                       "batch_size": 2}).data)
    assert module.num_classes == 2 and module.eval_batch_size == 2
    images, labels = _first_batch(module)
    assert images.shape == (2, 3, 32, 32) and labels.dtype == np.int32


def test_synthetic_config(tmp_path: Path) -> None:
    cfg = _config("synthetic", tmp_path, image_size=32, batch_size=8, **{"source.num_train": 16})
    module = instantiate(cfg.data)
    assert module.num_classes == 1000 and module.steps_per_epoch() == 2
    images, labels = _first_batch(module)
    assert images.shape == (8, 3, 32, 32) and labels.max() < 1000


def test_groups_compose_under_the_real_config(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF.parent), version_base=None):
        default = compose("config", overrides=[f"paths.root={tmp_path}"])
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", "data=synthetic", "data.image_size=32",
                                           "data.batch_size=8", "data.source.num_train=16", "seed=9"])
    assert default.data.name == "digits" and default.data.source.root == f"{tmp_path}/.cache/digits"
    module = instantiate(cfg.data)
    assert (module.image_size, module.seed, module.steps_per_epoch()) == (32, 9, 2)
    assert module.train_transform.image_size == 32


def test_configs_that_read_files_skip_bad_images() -> None:
    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        reads_files = cfg.source._target_ != f"{SyntheticSource.__module__}.{SyntheticSource.__name__}"
        assert cfg.get("on_bad_image") == ("skip" if reads_files else None), path.name


def _composed(root: Path, *overrides: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF.parent), version_base=None):
        return compose("config", overrides=[f"paths.root={root}", *overrides])


def test_on_bad_image_is_checked_before_anything_is_built(tmp_path: Path) -> None:
    validate_config(_composed(tmp_path, "data.on_bad_image=error"))
    validate_config(_composed(tmp_path, "data=synthetic"))  # no files, no key: the DataModule's default
    with pytest.raises(ConfigError) as caught:
        validate_config(_composed(tmp_path, "data=imagenet", "data.on_bad_image=ignore"))
    assert str(caught.value) == "data.on_bad_image='ignore'; choose one of skip, error"
