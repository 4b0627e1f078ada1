"""Device and process-group setup: the one module that knows about devices, ranks and msrun."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def tune_cpu() -> None:
    """oneDNN picks a ~90x slower reference convolution on AVX-512/AMX CPUs unless capped at AVX2."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def configure_device(hardware: Mapping[str, Any]) -> ProcessGroup:
    """Set MindSpore's device, execution mode and jit level; join the process group inside msrun workers."""
    import mindspore as ms

    target = hardware.get("device_target", "CPU")
    if target not in DEVICE_TARGETS:
        raise ValueError(f"hardware.device_target={target!r}; choose one of {', '.join(DEVICE_TARGETS)}")
    mode = hardware.get("mode", "graph")
    if mode not in MODES:
        raise ValueError(f"hardware.mode={mode!r}; choose one of {', '.join(MODES)}")
    if target == "CPU":
        tune_cpu()
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device(target)
    jit_level = hardware.get("jit_level")
    if jit_level:
        ms.set_context(jit_config={"jit_level": jit_level})
    if not in_msrun_worker():
        return ProcessGroup()
    return join_process_group(hardware)


def in_msrun_worker() -> bool:
    return os.environ.get("MS_ROLE") == "MS_WORKER" and "RANK_SIZE" in os.environ


def join_process_group(hardware: Mapping[str, Any]) -> ProcessGroup:
    """Inside an msrun worker: communication init and a data-parallel context with mean gradients."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    backend = hardware.get("backend")
    init(backend) if backend else init()
    world_size = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    return ProcessGroup(rank=get_rank(), world_size=world_size)


def all_reduce_sum(values: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """Sum a float vector over all ranks (identity in a single process)."""
    if not group.distributed:
        return values
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce(ops.ReduceOp.SUM)(ms.Tensor(values.astype(np.float32))).asnumpy().astype(values.dtype)
