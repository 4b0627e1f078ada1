"""Device and process-group setup: the one module that knows about devices, ranks and msrun roles.

`python run.py hardware=<multi-worker config>` re-launches itself under msrun (conformer.runtime.launch); msrun starts
one scheduler process (env MS_ROLE=MS_SCHED) and `workers` processes per node (MS_ROLE=MS_WORKER, RANK_ID,
RANK_SIZE). Both roles run the script: the scheduler serves the cluster inside `init()`, the workers join it
and train data-parallel (gradients all-reduced as a mean, each rank on its own shard of the data).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conformer.runtime import process_defaults

log = logging.getLogger(__name__)

ROLE_ENV, WORKER_ROLE, SCHEDULER_ROLE = "MS_ROLE", "MS_WORKER", "MS_SCHED"
DEVICE_NODES = {"Ascend": "/dev/davinci", "GPU": "/dev/nvidia"}  # + the device's number


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


def configure_device(hardware: Mapping[str, Any]) -> ProcessGroup:
    """Set MindSpore's device, execution mode, jit level, device options and kernel path (a checked hardware config,
    see conformer.config.validation.check_hardware); join the process group inside msrun workers."""
    target = hardware.get("device_target", "CPU")
    os.environ.update(mindspore_log_level(target))  # before MindSpore loads, where it has not yet
    ascend = hardware.get("ascend") or {}
    if ascend.get("overflow_mode"):  # read when MindSpore checks for overflows
        os.environ["MS_ASCEND_CHECK_OVERFLOW_MODE"] = str(ascend["overflow_mode"])
    import mindspore as ms

    from conformer import kernels

    ms.set_context(mode=ms.GRAPH_MODE if hardware.get("mode", "graph") == "graph" else ms.PYNATIVE_MODE)
    device_id = hardware.get("device_id")
    ms.set_device(target, None if device_id is None or target == "CPU" else int(device_id))
    jit_level = hardware.get("jit_level")
    if jit_level:
        ms.set_context(jit_config={"jit_level": jit_level})
    if target != "CPU":
        _device_options(hardware)
    if hardware.get("runtime_num_threads"):
        ms.set_context(runtime_num_threads=int(hardware["runtime_num_threads"]))
    if hardware.get("cpu_affinity"):
        ms.runtime.set_cpu_affinity(True)
    if in_msrun_scheduler():
        join_process_group(hardware)  # serves the cluster until the workers are done
        raise SystemExit(0)
    # msrun's scheduler never gets here: it builds no network, so it needs no kernel built
    kernels.select(hardware.get("kernels", "auto"), hardware.get("amp_level", "O0"))
    if not in_msrun_worker():
        return ProcessGroup()
    return join_process_group(hardware)


def mindspore_log_level(target: str) -> dict[str, str]:
    """GLOG_v for MindSpore on `target`, unless the user set it: warnings (2) on an accelerator, where they are what a
    new machine's problems look like; on the CPU the package's default (3: errors only) stands."""
    return {} if target == "CPU" or process_defaults.GLOG_V_FROM_USER else {"GLOG_v": "2"}


def _device_options(hardware: Mapping[str, Any]) -> None:
    """An accelerator's memory cap, determinism and (Ascend) operator precision."""
    import mindspore as ms

    if hardware.get("device_memory"):
        ms.runtime.set_memory(max_size=str(hardware["device_memory"]))
    if hardware.get("deterministic"):
        ms.set_context(deterministic="ON")
    precision = (hardware.get("ascend") or {}).get("precision_mode")
    if precision:
        from mindspore.device_context.ascend.op_precision import precision_mode

        precision_mode(str(precision))


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


def all_gather_floats(values: Iterable[float], group: ProcessGroup) -> np.ndarray:
    """Every rank's float vector (the same length on each), as rows in rank order."""
    row = np.asarray(list(values), np.float32)
    if not group.distributed:
        return row[None]
    import mindspore as ms
    from mindspore import ops

    return ops.AllGather()(ms.Tensor(row)).asnumpy().reshape(group.world_size, -1)


def device_checks(hardware: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """What this machine offers the config's device, as (check, what was found, passed) rows: the device nodes for
    every local worker, the vendor's tool answering, and (Ascend) the CANN toolkit."""
    target, workers = hardware.get("device_target", "CPU"), int(hardware.get("workers", 1))
    if target == "CPU":
        cores = len(os.sched_getaffinity(0))
        return [("devices", f"CPU, {cores} cores for {workers} worker(s)", True)]
    prefix, tool = DEVICE_NODES[target], {"Ascend": "npu-smi", "GPU": "nvidia-smi"}[target]
    count = local_devices(target)
    rows = [("devices", f"{count} x {prefix}<N> for {workers} worker(s)", count >= workers)]
    found = shutil.which(tool)
    answer = subprocess.run([found, "info" if target == "Ascend" else "-L"], capture_output=True, text=True,
                            check=False, timeout=60) if found else None
    rows.append((tool, "not on PATH" if answer is None else f"exit {answer.returncode}",
                 answer is not None and answer.returncode == 0))
    if target == "Ascend":
        rows.append(_cann_version())
    return rows


def local_devices(target: str) -> int:
    """How many `target` devices this machine shows (`/dev/davinci<N>`, `/dev/nvidia<N>`); 0 for the CPU."""
    prefix = DEVICE_NODES.get(target)
    if prefix is None:
        return 0
    return sum(path[len(prefix):].isdigit() for path in glob.glob(prefix + "*"))  # not davinci_manager, nvidiactl


def _cann_version() -> tuple[str, str, bool]:
    """The CANN toolkit's version, from its own files (where `set_env.sh` points ASCEND_HOME_PATH)."""
    home = os.environ.get("ASCEND_HOME_PATH") or "/usr/local/Ascend/ascend-toolkit/latest"
    for name in ("version.cfg", "compiler/version.info", "runtime/version.info"):
        path = Path(home) / name
        if path.is_file():
            version = re.search(r"[Vv]ersion=([^\s]+)", path.read_text())
            return "CANN", f"{version[1] if version else 'unknown'} ({path})", True
    return "CANN", f"not found under {home} (source set_env.sh of the toolkit)", False


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
