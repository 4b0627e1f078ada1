"""Sharding: disjoint/complete/equal shards, per-epoch reshuffle, repeated augmentation, MindSpore wrapper."""
from __future__ import annotations

from collections import Counter

import mindspore.dataset as ds
import numpy as np
import pytest

from conformer.data.sampler import ShardSampler, eval_shard, repeated_aug_shard, train_shard


@pytest.mark.parametrize(("size", "world"), [(12, 2), (12, 3), (13, 2), (14, 3), (5, 1)])
def test_train_shards_disjoint_equal_and_cover_the_epoch(size: int, world: int) -> None:
    shards = [train_shard(size, rank, world, seed=4, epoch=1) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == size // world
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))
    assert set(flat) <= set(range(size)) and size - len(flat) < world  # at most world - 1 dropped
    assert train_shard(size, 0, world, seed=4, epoch=1) == shards[0]  # same on every call / rank process


def test_train_order_reshuffles_per_epoch_and_seed() -> None:
    orders = {tuple(train_shard(100, 0, 1, seed=0, epoch=e)) for e in range(4)}
    assert len(orders) == 4 and all(sorted(o) == list(range(100)) for o in orders)
    assert train_shard(100, 0, 1, seed=1, epoch=0) != train_shard(100, 0, 1, seed=0, epoch=0)
    dropped = [set(range(13)) - {i for r in range(2) for i in train_shard(13, r, 2, 0, e)} for e in range(6)]
    assert len({frozenset(d) for d in dropped}) > 1  # a different sample sits out each epoch


@pytest.mark.parametrize(("size", "world"), [(10, 2), (11, 3), (7, 3), (4, 1)])
def test_eval_shards_are_disjoint_complete_without_padding(size: int, world: int) -> None:
    shards = [eval_shard(size, rank, world) for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeated_augmentation_counts(world: int) -> None:
    size, repeats = 30, 3
    shards = [repeated_aug_shard(size, r, world, seed=0, epoch=2, repeats=repeats) for r in range(world)]
    assert all(len(s) == size // world for s in shards)  # epoch stays ~ one dataset long
    counts = Counter(i for s in shards for i in s)
    assert max(counts.values()) <= repeats
    if world == repeats:
        assert set(counts.values()) == {repeats} and len(counts) == size // repeats
        assert all(len(set(s)) == len(s) for s in shards)  # the copies of a sample go to different ranks
    if world == 1:
        assert shards[0][:3] == [shards[0][0]] * 3  # consecutive copies on a single device


def test_sampler_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="rank"):
        train_shard(10, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="world_size"):
        eval_shard(10, 0, 0)
    with pytest.raises(ValueError, match="repeats"):
        repeated_aug_shard(10, 0, 1, 0, 0, repeats=0)


class _Indices:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[np.ndarray]:
        return (np.array(index, dtype=np.int32),)


def _epochs(sampler: ShardSampler, size: int, epochs: int) -> list[list[int]]:
    dataset = ds.GeneratorDataset(_Indices(size), ["index"], sampler=sampler, python_multiprocessing=False)
    iterator = dataset.batch(4).create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    return [[int(i) for (batch,) in iterator for i in batch] for _ in range(epochs)]


def test_mindspore_sampler_follows_the_pure_functions_each_epoch() -> None:
    seen = _epochs(ShardSampler(22, rank=1, world_size=2, seed=5), 22, 3)
    assert seen == [train_shard(22, 1, 2, 5, e) for e in range(3)]
    resumed = _epochs(ShardSampler(22, rank=1, world_size=2, seed=5, start_epoch=2), 22, 1)
    assert resumed[0] == seen[2]
    repeated = _epochs(ShardSampler(22, rank=0, world_size=2, seed=5, repeats=3), 22, 2)
    assert repeated == [repeated_aug_shard(22, 0, 2, 5, e, 3) for e in range(2)]
    evaluation = _epochs(ShardSampler(7, rank=2, world_size=3, train=False), 7, 2)
    assert evaluation == [[2, 5], [2, 5]]
