"""DataModule on a real JPEG tree: batches, dtypes, per-epoch order, sharding, Mixup, determinism, errors, bad
image files."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from conformer.data.generated import SyntheticSource, write_image_folder
from conformer.data.mixup import Mixup, smooth_one_hot
from conformer.data.module import DataModule
from conformer.data.sampler import repeated_aug_shard, train_shard
from conformer.data.sources import ImageFolderSource
from conformer.data.transforms import EvalTransform, TrainTransform

from .test_data_sources import write_corrupt_jpeg, write_truncated

SIZE = 32


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderSource:
    root = write_image_folder(tmp_path_factory.mktemp("jpegs"), num_classes=4, train_per_class=6,
                              val_per_class=3, size=(48, 40))
    return ImageFolderSource(root)


def _module(source, **overrides) -> DataModule:
    kwargs = {"name": "tiny", "source": source, "image_size": SIZE, "batch_size": 4,
              "train_transform": TrainTransform(SIZE), "eval_transform": EvalTransform(SIZE),
              "num_workers": 2}
    kwargs.update(overrides)
    return DataModule(**kwargs)


def _epochs(dataset, epochs: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    iterator = dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    return [[(x, y) for x, y in iterator] for _ in range(epochs)]


def test_train_batches_follow_the_epoch_permutation(source: ImageFolderSource) -> None:
    module = _module(source, seed=3)
    assert (module.train_size, module.val_size, module.num_classes) == (24, 12, 4)
    assert module.classes == ["class_00", "class_01", "class_02", "class_03"]
    assert module.steps_per_epoch() == 6 and module.steps_per_epoch(world_size=2) == 3
    epochs = _epochs(module.train_loader(), 2)
    labels = [np.concatenate([y for _, y in epoch]).tolist() for epoch in epochs]
    for epoch, batches in enumerate(epochs):
        assert len(batches) == 6
        images, targets = batches[0]
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == np.float32
        assert targets.shape == (4,) and targets.dtype == np.int32
        assert -2.2 < images.min() < images.max() < 2.7  # ImageNet-normalised [0, 1] pixels
        assert labels[epoch] == [source.train_samples[i][1] for i in train_shard(24, 0, 1, 3, epoch)]
    assert labels[0] != labels[1]


def test_train_shards_give_equal_step_counts(source: ImageFolderSource) -> None:
    module = _module(source, batch_size=5)
    counts = [len(_epochs(module.train_loader(rank, 2), 1)[0]) for rank in range(2)]
    assert counts == [module.steps_per_epoch(2)] * 2 == [2, 2]


def test_repeated_augmentation_reaches_the_loader(source: ImageFolderSource) -> None:
    module = _module(source, repeated_aug=3, seed=2)
    labels = np.concatenate([y for _, y in _epochs(module.train_loader(), 1)[0]]).tolist()
    assert labels == [source.train_samples[i][1] for i in repeated_aug_shard(24, 0, 1, 2, 0, 3)]
    assert module.steps_per_epoch() == 6


def test_val_shards_cover_the_split_once_with_partial_batches(source: ImageFolderSource) -> None:
    module = _module(source, eval_batch_size=5)
    shards = [_epochs(module.val_loader(rank, 2), 1)[0] for rank in range(2)]
    assert [[len(y) for _, y in shard] for shard in shards] == [[5, 1], [5, 1]]
    labels = sorted(int(v) for shard in shards for _, y in shard for v in y)
    assert labels == sorted(y for _, y in source.val_samples)
    images, targets = shards[0][0]
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == np.float32 and targets.dtype == np.int32


def test_limited_val_batches_are_the_same_first_ones_in_every_epoch_on_every_rank(source: ImageFolderSource) -> None:
    """`trainer.limit_val_batches`: each evaluation of a run reads the first k batches of its shard (a pipeline that
    spans the epochs once cut them from where the last evaluation stopped, and every other one came out empty)."""
    module = _module(source, eval_batch_size=2)
    for rank in range(2):
        full = _epochs(module.val_loader(rank, 2), 1)[0]
        epochs = _epochs(module.val_loader(rank, 2, limit_batches=2), 3)
        assert len(full) == 3 and [len(epoch) for epoch in epochs] == [2, 2, 2]
        for epoch in epochs:
            for (x, y), (x_full, y_full) in zip(epoch, full[:2]):
                np.testing.assert_array_equal(x, x_full)
                np.testing.assert_array_equal(y, y_full)


def test_mixup_gives_soft_targets(source: ImageFolderSource) -> None:
    module = _module(source, mixup=Mixup(label_smoothing=0.1))
    images, targets = _epochs(module.train_loader(), 1)[0][0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == np.float32
    assert targets.shape == (4, 4) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
    assert targets.min() >= 0.1 / 4 - 1e-6


def test_loader_mixes_each_batch_with_its_own_seeded_lambda(source: ImageFolderSource) -> None:
    """Through the loader (the wiring a training uses): batch k's targets carry the k-th Beta(0.8, 0.8) draw of the
    stream seeded by (seed, rank, start epoch), over two epochs, and the lams spread."""
    module = _module(source, seed=3, mixup=Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1))
    stream = np.random.default_rng([3, 0, 0])
    lams, expected = [], []
    for epoch, batches in enumerate(_epochs(module.train_loader(), 2)):
        order = train_shard(24, 0, 1, 3, epoch)
        for index, (_, targets) in enumerate(batches):
            stream.random()  # the `prob` draw
            expected.append(stream.beta(0.8, 0.8))
            labels = np.array([source.train_samples[i][1] for i in order[4 * index:4 * index + 4]])
            mixed = smooth_one_hot(labels, 4, 0.1), smooth_one_hot(labels[::-1], 4, 0.1)
            differs = labels != labels[::-1]  # there the own label's mass tells lam
            assert differs.any()
            own = np.arange(4)[differs][0]
            on, off = mixed[0][own].max(), mixed[0][own].min()
            lams.append((targets[own, labels[own]] - off) / (on - off))
            np.testing.assert_allclose(targets, lams[-1] * mixed[0] + (1 - lams[-1]) * mixed[1], atol=1e-6)
    np.testing.assert_allclose(lams, expected, atol=1e-5)
    assert len(lams) == 12 and np.std(lams) > 0.15, lams


def test_same_seed_same_batches_with_full_augmentation(source: ImageFolderSource) -> None:
    transform = TrainTransform(SIZE, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    runs = []
    for _ in range(2):
        ms.set_seed(11)
        module = _module(source, train_transform=transform, mixup=Mixup(), num_workers=1)
        runs.append(_epochs(module.train_loader(), 2))
    for batch_a, batch_b in zip(sum(runs[0], []), sum(runs[1], [])):
        np.testing.assert_array_equal(batch_a[0], batch_b[0])
        np.testing.assert_array_equal(batch_a[1], batch_b[1])
    assert not np.array_equal(runs[0][0][0][0], runs[0][1][0][0])


def test_synthetic_source_runs_through_the_same_pipeline() -> None:
    source = SyntheticSource(num_train=8, num_val=4, num_classes=3, height=40, width=36)
    module = _module(source, mixup=Mixup())
    images, targets = _epochs(module.train_loader(), 1)[0][0]
    assert images.shape == (4, 3, SIZE, SIZE) and targets.shape == (4, 3)
    images, labels = _epochs(module.val_loader(), 1)[0][0]
    assert images.shape == (4, 3, SIZE, SIZE) and labels.tolist() == [y for _, y in source.val_samples]


def test_workers_are_capped_at_the_core_count(source: ImageFolderSource) -> None:
    assert _module(source, num_workers=512).num_workers == os.cpu_count()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 0}, "data.image_size=0"),
        ({"image_size": 48}, "differs from data.image_size"),
        ({"num_classes": 10}, "num_classes=10"),
        ({"mixup": Mixup(), "batch_size": 3}, "even"),
        ({"mixup": Mixup(), "drop_last": False}, "drop_last"),
        ({"num_workers": 0}, "num_workers"),
        ({"repeated_aug": 0}, "repeated_aug"),
        ({"on_bad_image": "ignore"}, re.escape("data.on_bad_image='ignore'; choose one of skip, error")),
    ],
)
def test_bad_settings_fail_early(source: ImageFolderSource, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _module(source, **overrides)


def test_unbuilt_components_are_reported(source: ImageFolderSource) -> None:
    with pytest.raises(TypeError, match="data.source must be a data source"):
        _module("/data/imagenet")
    with pytest.raises(TypeError, match="data.eval_transform"):
        _module(source, eval_transform={"image_size": SIZE})


def test_too_small_a_split_is_reported(source: ImageFolderSource, tmp_path: Path) -> None:
    module = _module(source, batch_size=16)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        module.steps_per_epoch(world_size=2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        module.train_loader(0, 2)


# ---------------------------------------------------------------------------------------------------- bad images
@pytest.fixture(scope="module")
def bad_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageFolderSource, list[Path]]:
    """4 classes x 5 train + 2 val JPEGs plus a corrupt and a truncated train JPEG and a truncated val JPEG."""
    root = write_image_folder(tmp_path_factory.mktemp("bad"), num_classes=4, train_per_class=5, val_per_class=2,
                              size=(48, 40))
    good = root / "train" / "class_00" / "train_00_0000.jpg"
    bad = [write_corrupt_jpeg(root / "train" / "class_01" / "corrupt.jpg"),
           write_truncated(root / "train" / "class_02" / "truncated.jpg", good),
           write_truncated(root / "val" / "class_03" / "truncated.jpg", good)]
    return ImageFolderSource(root), bad


def _replacements(source: ImageFolderSource, bad: list[Path], split: str) -> list[int]:
    """Each sample's index after skipping: a bad one is replaced by the next good one of its split."""
    paths = [p for p, _ in source.samples(split)]
    good = [p not in map(str, bad) for p in paths]
    return [next(j % len(paths) for j in range(i, i + len(paths)) if good[j % len(paths)]) for i in range(len(paths))]


def test_bad_images_are_skipped_by_name_with_full_epochs(bad_source, caplog: pytest.LogCaptureFixture) -> None:
    source, bad = bad_source
    module = _module(source, seed=4)
    assert (module.train_size, module.val_size, module.steps_per_epoch()) == (22, 9, 5)
    assert module.skipped_images == {"train": 0, "val": 0}
    with caplog.at_level(logging.WARNING, logger="conformer.data.sources"):
        epochs = _epochs(module.train_loader(), 3)
        val = _epochs(module.val_loader(), 2)
    replaced = _replacements(source, bad, "train")
    for epoch, batches in enumerate(epochs):
        assert [len(y) for _, y in batches] == [4] * module.steps_per_epoch()
        assert all(images.shape == (4, 3, SIZE, SIZE) for images, _ in batches)
        labels = np.concatenate([y for _, y in batches]).tolist()
        order = train_shard(22, 0, 1, 4, epoch)[:20]  # the last partial batch is dropped
        assert labels == [source.train_samples[replaced[i]][1] for i in order]
    replaced = _replacements(source, bad, "val")
    for batches in val:
        assert np.concatenate([y for _, y in batches]).tolist() == [source.val_samples[i][1] for i in replaced]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(next(str(p) for p in bad if str(p) in m) for m in warned) == sorted(map(str, bad))  # once each
    assert module.skipped_images == {"train": 2, "val": 1}
    _epochs(module.train_loader(start_epoch=3), 1)  # a new loader, e.g. after a resume: still counted once
    assert module.skipped_images == {"train": 2, "val": 1} and len(caplog.records) == len(warned)


def test_bad_image_under_error_fails_naming_it(bad_source) -> None:
    source, bad = bad_source
    module = _module(source, seed=4, on_bad_image="error")
    first_bad = next(source.train_samples[i][0] for i in train_shard(22, 0, 1, 4, 0)
                     if source.train_samples[i][0] in map(str, bad))
    with pytest.raises(RuntimeError, match=re.escape(f"cannot decode image {first_bad}: ")):
        _epochs(module.train_loader(), 1)
    with pytest.raises(RuntimeError, match=re.escape(f"cannot decode image {bad[2]}: OSError: ")):
        _epochs(module.val_loader(), 1)
