"""Data-parallel sharding as pure functions of (size, rank, world_size, seed, epoch), and a MindSpore sampler.

- train: one permutation per epoch, seeded by ``(seed, epoch)`` and identical on every rank, truncated to a
  multiple of ``world_size`` and dealt out round-robin: shards are disjoint and of equal length (equal step
  counts); the < ``world_size`` samples dropped differ from epoch to epoch.
- repeated augmentation (DeiT's RASampler): every index of the permutation appears ``repeats`` times in a row,
  dealt round-robin so the copies land on different ranks (different augmentations); each rank keeps
  ``size // world_size`` indices, so an epoch stays about one dataset long.
- eval: ``range(size)`` dealt round-robin; disjoint, complete, no padding (lengths differ by at most one).
"""
from __future__ import annotations

import mindspore.dataset as ds
import numpy as np

__all__ = ["ShardSampler", "eval_shard", "repeated_aug_shard", "train_shard", "train_shard_length"]


def _check(size: int, rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if size < 0:
        raise ValueError(f"dataset size={size} must be >= 0")


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch ``epoch``; the same on every rank."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(size)


def train_shard_length(size: int, world_size: int) -> int:
    """Samples per rank and epoch of a train shard (with or without repeated augmentation)."""
    return size // world_size


def train_shard(size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """Rank ``rank``'s train indices for ``epoch``: disjoint shards of equal length."""
    _check(size, rank, world_size)
    total = train_shard_length(size, world_size) * world_size
    return epoch_permutation(size, seed, epoch)[:total][rank::world_size].tolist()


def repeated_aug_shard(size: int, rank: int, world_size: int, seed: int, epoch: int,
                       repeats: int = 3) -> list[int]:
    """Rank ``rank``'s indices with each sample repeated ``repeats`` times across ranks (DeiT RASampler)."""
    _check(size, rank, world_size)
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    repeated = np.repeat(epoch_permutation(size, seed, epoch), repeats)
    per_rank = -(-len(repeated) // world_size)
    padded = np.resize(repeated, per_rank * world_size)  # wraps around from the start, as DeiT pads
    return padded[rank::world_size][:train_shard_length(size, world_size)].tolist()


def eval_shard(size: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s eval indices: every sample exactly once over all ranks."""
    _check(size, rank, world_size)
    return list(range(rank, size, world_size))


class ShardSampler(ds.Sampler):
    """MindSpore sampler over the pure functions above; advances one epoch per pipeline reset.

    MindSpore calls ``reset()`` after each epoch and ``__iter__`` for the next, so the train order reshuffles
    every epoch without the trainer's help; ``start_epoch`` resumes the sequence.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, train: bool = True, seed: int = 0,
                 repeats: int = 1, start_epoch: int = 0) -> None:
        _check(size, rank, world_size)
        self.size, self.rank, self.world_size, self.train = int(size), int(rank), int(world_size), bool(train)
        self.seed, self.repeats, self.epoch = int(seed), int(repeats), int(start_epoch)
        if self.repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        super().__init__()

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.train:
            return eval_shard(self.size, self.rank, self.world_size)
        if self.repeats > 1:
            return repeated_aug_shard(self.size, self.rank, self.world_size, self.seed, epoch, self.repeats)
        return train_shard(self.size, self.rank, self.world_size, self.seed, epoch)

    def __len__(self) -> int:
        if self.train:
            return train_shard_length(self.size, self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        return iter(self.indices())

    def reset(self) -> None:
        self.epoch += 1
