"""Device and process-group setup: the one module that knows about devices, ranks and msrun roles.

`python run.py hardware=<multi-worker config>` re-launches itself under msrun (conformer.launch); msrun starts
one scheduler process (env MS_ROLE=MS_SCHED) and `workers` processes per node (MS_ROLE=MS_WORKER, RANK_ID,
RANK_SIZE). Both roles run the script: the scheduler serves the cluster inside `init()`, the workers join it
and train data-parallel (gradients all-reduced as a mean, each rank on its own shard of the data).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformer.validation import ConfigError

log = logging.getLogger(__name__)

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
BACKENDS = {"CPU": "mccl", "GPU": "nccl", "Ascend": "hccl"}  # MindSpore's collective library per device
PARALLEL_MODES = ("data_parallel",)
ROLE_ENV, WORKER_ROLE, SCHEDULER_ROLE = "MS_ROLE", "MS_WORKER", "MS_SCHED"


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
    if in_msrun_scheduler():
        join_process_group(hardware)  # serves the cluster until the workers are done
        raise SystemExit(0)
    if not in_msrun_worker():
        return ProcessGroup()
    return join_process_group(hardware)


def in_msrun_worker() -> bool:
    return os.environ.get(ROLE_ENV) == WORKER_ROLE and "RANK_SIZE" in os.environ


def in_msrun_scheduler() -> bool:
    """msrun's scheduler process: it must do nothing before `init()` (no MLflow runs, no files)."""
    return os.environ.get(ROLE_ENV) == SCHEDULER_ROLE


def world_size(hardware: Mapping[str, Any]) -> int:
    """Processes of the whole job: `workers` per node x `nodes`."""
    return int(hardware.get("workers", 1)) * int(hardware.get("nodes", 1))


def in_launcher() -> bool:
    """A plain process, not started by msrun (where a multi-worker job is launched from)."""
    return os.environ.get(ROLE_ENV) is None


def needs_msrun(hardware: Mapping[str, Any]) -> bool:
    """True in a plain `python run.py` whose hardware asks for more than one worker (not yet under msrun)."""
    return world_size(hardware) > 1 and in_launcher()


def _int_at_least(hardware: Mapping[str, Any], key: str, low: int, hint: str) -> int:
    value = hardware.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"hardware.{key}={value!r} must be an integer >= {low} ({hint})")
    return value


def check_hardware(hardware: Mapping[str, Any]) -> None:
    """Raise ConfigError for a hardware config that cannot launch, before any process is started."""
    target = hardware.get("device_target", "CPU")
    if target not in DEVICE_TARGETS:
        raise ConfigError(f"hardware.device_target={target!r}; choose one of {', '.join(DEVICE_TARGETS)}")
    workers = _int_at_least(hardware, "workers", 1, "processes per node, one per device")
    nodes = _int_at_least(hardware, "nodes", 1, "machines in the job") if "nodes" in hardware else 1
    if workers * nodes == 1:
        return
    backend = hardware.get("backend")
    if backend not in (None, BACKENDS[target]):
        raise ConfigError(f"hardware.backend={backend!r} does not work on {target}: use "
                          f"hardware.backend={BACKENDS[target]} (or null to let MindSpore pick it)")
    mode = hardware.get("parallel_mode", "data_parallel")
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"hardware.parallel_mode={mode!r}; only {', '.join(PARALLEL_MODES)} is supported")
    node_rank = _int_at_least(hardware, "node_rank", 0, "this machine's index in the job")
    if node_rank >= nodes:
        raise ConfigError(f"hardware.node_rank={node_rank} must be below hardware.nodes={nodes}")
    port = hardware.get("master_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535):
        raise ConfigError(f"hardware.master_port={port!r} must be a port in [1024, 65535], or null for a free one")
    if nodes > 1:
        if port is None:
            raise ConfigError(f"hardware.nodes={nodes} needs one fixed port on every node: set "
                              "hardware.master_port (e.g. 8118)")
        if _is_loopback(str(hardware.get("master_addr"))):
            raise ConfigError(f"hardware.nodes={nodes} needs hardware.master_addr=<IP or host name of node 0>, "
                              f"got {hardware.get('master_addr')!r} (a loopback address)")
    msrun = hardware.get("msrun") or {}
    timeout = msrun.get("cluster_time_out")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ConfigError(f"hardware.msrun.cluster_time_out={timeout!r} must be a positive number of seconds "
                          "(msrun waits that long for missing workers before it fails)")


def _is_loopback(address: str) -> bool:
    if address in ("localhost", "None", ""):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False


def join_process_group(hardware: Mapping[str, Any]) -> ProcessGroup:
    """Inside an msrun worker: communication init and a data-parallel context with mean gradients."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    backend = hardware.get("backend")
    init(backend) if backend else init()
    size = get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                 gradients_mean=bool(hardware.get("gradients_mean", True)), device_num=size)
    group = ProcessGroup(rank=get_rank(), world_size=size)
    if size != world_size(hardware):
        log.warning("msrun started %d workers but hardware=%s asks for %d: training with %d", size,
                    hardware.get("name"), world_size(hardware), size)
    return group


def all_reduce_sum(values: np.ndarray, group: ProcessGroup) -> np.ndarray:
    """Sum a float vector over all ranks (identity in a single process)."""
    if not group.distributed:
        return values
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce(ops.ReduceOp.SUM)(ms.Tensor(values.astype(np.float32))).asnumpy().astype(values.dtype)


def weights_digest(params: Iterable[Any]) -> str:
    """SHA-256 over the names and bytes of `params` (MindSpore Parameters), in name order."""
    digest = hashlib.sha256()
    for param in sorted(params, key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
    return digest.hexdigest()


def all_gather_digest(digest: str, group: ProcessGroup) -> list[str]:
    """Every rank's hex digest (all the same length), in rank order."""
    if not group.distributed:
        return [digest]
    import mindspore as ms
    from mindspore import ops

    raw = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8).astype(np.int32)
    gathered = ops.AllGather()(ms.Tensor(raw)).asnumpy().reshape(group.world_size, -1)
    return [row.astype(np.uint8).tobytes().hex() for row in gathered]


def replicas_in_sync(params: Iterable[Any], group: ProcessGroup) -> bool:
    """Check that every rank holds the same `params` (data parallelism keeps the trainable weights identical).

    Logs this rank's digest and, on a mismatch, which ranks differ from rank 0. BatchNorm running statistics
    are per rank by design (each rank normalises its own batch): pass trainable parameters only.
    """
    if not group.distributed:
        return True
    digests = all_gather_digest(weights_digest(params), group)
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        log.error("ranks %s hold other weights than rank 0 (sha256 %s vs %s): data-parallel replicas diverged",
                  differ, [digests[r][:16] for r in differ], digests[0][:16])
    else:
        log.info("trainable weights sha256 %s, identical on all %d ranks", digests[0], group.world_size)
    return not differ
