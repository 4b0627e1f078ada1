"""The next batch on its way while this one trains: a reader thread one batch ahead, on the device where it is
not the host."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import mindspore as ms
from mindspore import Tensor

_END = object()


def to_device(batch: Any, target: str) -> Any:
    """`batch`'s tensors copied to `target` without waiting ("GPU", "Ascend"); on the CPU they are there already."""
    if target == "CPU":
        return batch
    return tuple(item.move_to(target, blocking=False) if isinstance(item, Tensor) else item for item in batch)


def prefetched(batches: Iterable, depth: int = 1, target: str | None = None) -> Iterator:
    """`batches` in order, read by a thread that keeps up to `depth` of them ready (and copied to the device), so
    that the reader's work and the copy overlap the step the caller runs meanwhile (MindSpore releases the GIL
    while a graph runs). An error in the reader is raised here; closing the iterator stops the reader."""
    target = target or ms.get_context("device_target")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(to_device(batch, target)):
                    return
            put(_END)
        except BaseException as error:  # handed to the training thread, which raises it
            put(error)

    reader = threading.Thread(target=read, name="batch-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()
