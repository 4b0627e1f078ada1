"""DataModule: a source, its transforms, batching, Mixup and sharding, as MindSpore datasets per rank.

Built by ``hydra.utils.instantiate`` from ``conf/data/*.yaml``. ``train_loader`` yields
``(images float32 [B, 3, H, W], targets)`` with int32 ``[B]`` labels, or float32 ``[B, num_classes]`` soft
targets when Mixup is on; it reshuffles every epoch (iterate ``create_tuple_iterator(num_epochs=...)``).
``val_loader`` yields ``(images, int32 labels)``, sharded without padding, last batch kept. A bad image file
(corrupt, truncated) is skipped with a warning or raised by name (``on_bad_image``); ``skipped_images`` counts them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Union

import mindspore.dataset as ds

from conformer.checks import require_choice, require_int
from conformer.data.arguments import check_mixup_batches, check_transform_size
from conformer.data.mixup import Mixup
from conformer.data.sampler import ShardSampler, train_shard_length
from conformer.data.sources import SPLITS, CheckedReader, Source
from conformer.data.transforms import EvalTransform, Stage, TrainTransform
from conformer.vocabulary import BAD_IMAGE_POLICIES

__all__ = ["DataModule"]

COLUMNS = ["image", "label"]
MixupSpec = Union[Mixup, Callable[..., Mixup], None]


class DataModule:
    """One dataset's loaders for every rank of a data-parallel run."""

    def __init__(self, name: str, source: Source, image_size: int, batch_size: int,
                 train_transform: TrainTransform, eval_transform: EvalTransform,
                 num_classes: int | None = None, eval_batch_size: int | None = None, num_workers: int = 2,
                 mixup: MixupSpec = None, repeated_aug: int = 1, drop_last: bool = True,
                 seed: int = 0, on_bad_image: str = "skip") -> None:
        if not isinstance(source, Source):
            raise TypeError(f"data.source must be a data source (e.g. conformer.data.sources."
                            f"ImageFolderSource with a _target_), got {type(source).__name__}: {source!r}")
        for kind, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if not hasattr(transform, "stages"):
                raise TypeError(f"data.{kind} must be a TrainTransform/EvalTransform (give it a "
                                f"_target_), got {type(transform).__name__}")
        self.name, self.source = name, source
        self.image_size = require_int(image_size, "data.image_size")
        for kind, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            check_transform_size(kind, transform.image_size, image_size)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size = require_int(batch_size, "data.batch_size")
        self.eval_batch_size = require_int(eval_batch_size or batch_size, "data.eval_batch_size")
        self.num_workers = min(require_int(num_workers, "data.num_workers"), os.cpu_count() or 1)
        self.repeated_aug = require_int(repeated_aug, "data.repeated_aug")
        self.drop_last, self.seed = bool(drop_last), int(seed)
        if num_classes is not None and num_classes != source.num_classes:
            raise ValueError(f"data.num_classes={num_classes} but {source!r} has {source.num_classes} "
                             "classes: fix num_classes or set it to null to take it from the data")
        self.mixup = self._bind_mixup(mixup)
        self.on_bad_image = require_choice(on_bad_image, "data.on_bad_image", BAD_IMAGE_POLICIES)
        self._readers: dict[str, Any] = {}

    def _bind_mixup(self, mixup: MixupSpec) -> Mixup | None:
        if mixup is None:
            return None
        if not isinstance(mixup, Mixup):
            mixup = mixup()  # a factory, e.g. Hydra's ``_partial_: true``
        check_mixup_batches(self.batch_size, self.drop_last)
        return mixup.bind(self.num_classes)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def train_size(self) -> int:
        return self.source.train_size

    @property
    def val_size(self) -> int:
        return self.source.val_size

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Train batches per epoch on each device (the global batch is ``batch_size * world_size``)."""
        per_rank = train_shard_length(self.train_size, require_int(world_size, "world_size"))
        steps = per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        if steps == 0:
            raise ValueError(f"the train split of {self.name!r} gives {per_rank} samples per device "
                             f"({self.train_size} over {world_size}), fewer than batch_size="
                             f"{self.batch_size}: lower data.batch_size or use fewer devices")
        return steps

    @property
    def skipped_images(self) -> dict[str, int]:
        """Distinct bad image files met so far in this process, per split: ``{'train': n, 'val': m}``.

        Each rank counts what its own shard met; a file counts once however many epochs meet it.
        """
        counts = dict.fromkeys(SPLITS, 0)
        for split, reader in self._readers.items():
            if isinstance(reader, CheckedReader):
                counts[split] = len(reader.bad_images)
        return counts

    def _split_reader(self, split: str) -> Any:
        """One reader per split for the module's life, so what it learns about bad files lasts across loaders."""
        if split not in self._readers:
            reader = self.source.reader(split)
            if self.source.encoded:
                reader = CheckedReader(reader, self.source.samples(split), self.on_bad_image, split)
            self._readers[split] = reader
        return self._readers[split]

    def _reader(self, split: str, sampler: ShardSampler) -> ds.GeneratorDataset:
        # threads, not processes: the reader's record of bad files must stay in this process
        return ds.GeneratorDataset(self._split_reader(split), column_names=COLUMNS, sampler=sampler,
                                   python_multiprocessing=False)

    def _map(self, dataset: ds.Dataset, transform: TrainTransform | EvalTransform) -> ds.Dataset:
        stages = transform.stages(decode=self.source.encoded)
        if self.num_workers == 1:
            # one map, one thread: Python ops draw from the shared `random` in a fixed order (determinism)
            stages = [Stage([op for stage in stages for op in stage.ops])]
        for stage in stages:
            dataset = dataset.map(stage.ops, input_columns="image", num_parallel_workers=self.num_workers,
                                  python_multiprocessing=stage.processes and self.num_workers > 1)
        return dataset

    def train_loader(self, rank: int = 0, world_size: int = 1, start_epoch: int = 0) -> ds.Dataset:
        """Rank ``rank``'s train pipeline, reshuffled each epoch; ``start_epoch`` resumes the order."""
        self.steps_per_epoch(world_size)
        sampler = ShardSampler(self.train_size, rank, world_size, train=True, seed=self.seed,
                               repeats=self.repeated_aug, start_epoch=start_epoch)
        dataset = self._map(self._reader("train", sampler), self.train_transform)
        dataset = dataset.batch(self.batch_size, drop_remainder=self.drop_last)
        if self.mixup is not None:
            mixup = self.mixup.bind(self.num_classes, seed=[self.seed, rank, start_epoch])
            dataset = dataset.map(mixup, input_columns=COLUMNS, output_columns=COLUMNS,
                                  num_parallel_workers=1, python_multiprocessing=False)
        return dataset

    def val_loader(self, rank: int = 0, world_size: int = 1, limit_batches: int | None = None) -> ds.Dataset:
        """Rank ``rank``'s share of the val split (no padding, no duplicates), in file order; with `limit_batches`
        its first batches only, the same ones in every epoch (every rank has at least one)."""
        if self.val_size < require_int(world_size, "world_size"):
            raise ValueError(f"the val split of {self.name!r} has {self.val_size} samples, fewer than "
                             f"world_size={world_size}: every device needs at least one")
        sampler = ShardSampler(self.val_size, rank, world_size, train=False)
        dataset = self._map(self._reader("val", sampler), self.eval_transform)
        dataset = dataset.batch(self.eval_batch_size, drop_remainder=False)
        return dataset.take(int(limit_batches)) if limit_batches else dataset

    def __repr__(self) -> str:
        return (f"DataModule({self.name!r}, {self.source!r}, image_size={self.image_size}, "
                f"batch_size={self.batch_size}, mixup={self.mixup is not None}, "
                f"repeated_aug={self.repeated_aug})")
