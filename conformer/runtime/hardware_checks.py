"""The hardware config's checks, before any process starts (plain Python: no MindSpore)."""
from __future__ import annotations

import glob
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from conformer.checks import require_bool, require_choice, require_int
from conformer.errors import ConfigError
from conformer.kernels import KERNEL_PATHS, kernel_path_problem
from conformer.vocabulary import (
    AMP_LEVELS,
    ASCEND_OVERFLOW_MODES,
    ASCEND_PRECISION_MODES,
    BACKENDS,
    DEVICE_TARGETS,
    JIT_LEVELS,
    MODES,
    PARALLEL_MODES,
)


def check_hardware(hardware: Mapping[str, Any]) -> None:
    """Raise ConfigError for a hardware config that cannot launch, before any process is started."""
    target = require_choice(hardware.get("device_target", "CPU"), "hardware.device_target", DEVICE_TARGETS)
    require_choice(hardware.get("mode", "graph"), "hardware.mode", MODES)
    if hardware.get("runtime_num_threads") is not None:
        require_int(hardware.get("runtime_num_threads"), "hardware.runtime_num_threads", hint="or null: the default")
    require_bool(hardware.get("cpu_affinity", False), "hardware.cpu_affinity")
    _check_device_settings(hardware, target)
    workers = require_int(hardware.get("workers"), "hardware.workers", hint="processes per node, one per device")
    nodes = require_int(hardware.get("nodes", 1), "hardware.nodes", hint="machines in the job")
    if workers * nodes == 1:
        return
    backend = hardware.get("backend")
    if backend not in (None, BACKENDS[target]):
        raise ConfigError(f"hardware.backend={backend!r} does not work on {target}: use "
                          f"hardware.backend={BACKENDS[target]} (or null to let MindSpore pick it)")
    mode = hardware.get("parallel_mode", "data_parallel")
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"hardware.parallel_mode={mode!r}; only {', '.join(PARALLEL_MODES)} is supported")
    node_rank = require_int(hardware.get("node_rank"), "hardware.node_rank", minimum=0,
                            hint="this machine's index in the job")
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
    timeout = (hardware.get("msrun") or {}).get("cluster_time_out")
    require_int(timeout, "hardware.msrun.cluster_time_out",
                hint="seconds msrun waits for missing workers before it fails")


def _check_device_settings(hardware: Mapping[str, Any], target: str) -> None:
    """The kernel path, jit level, memory cap, determinism and Ascend options of a hardware config."""
    amp = require_choice(hardware.get("amp_level", "O0"), "hardware.amp_level", AMP_LEVELS)
    kernels = require_choice(hardware.get("kernels", "auto"), "hardware.kernels", KERNEL_PATHS)
    problem = kernel_path_problem(kernels, target, amp)
    if problem:
        raise ConfigError(f"hardware.kernels={kernels} with hardware.amp_level={amp} on {target}: {problem}")
    jit_level = hardware.get("jit_level")
    if jit_level is not None and jit_level not in JIT_LEVELS[target]:
        raise ConfigError(f"hardware.jit_level={jit_level!r} does not run on {target}: choose one of "
                          f"{', '.join(JIT_LEVELS[target])} or null (MindSpore's default; O2 is Ascend's GraphEngine)")
    memory = hardware.get("device_memory")
    if memory is not None and not (isinstance(memory, str) and re.fullmatch(r"\d+(\.\d+)?GB", memory)):
        raise ConfigError(f"hardware.device_memory={memory!r} must be a size in GB such as 29GB, or null")
    for key in ("device_id", "devices"):
        if hardware.get(key) is not None:
            require_int(hardware.get(key), f"hardware.{key}", minimum=0 if key == "device_id" else 1,
                        hint="or null" + (": MindSpore's default" if key == "device_id" else ": every card found"))
    require_bool(hardware.get("share_devices", False), "hardware.share_devices")
    require_bool(hardware.get("deterministic", False), "hardware.deterministic")
    ascend = {key: value for key, value in (hardware.get("ascend") or {}).items() if value is not None}
    if ascend and target != "Ascend":
        raise ConfigError(f"hardware.ascend sets Ascend options, and this config runs on {target}: drop them")
    if ascend.get("precision_mode") is not None:
        require_choice(ascend["precision_mode"], "hardware.ascend.precision_mode", ASCEND_PRECISION_MODES)
    if ascend.get("overflow_mode") is not None:
        require_choice(ascend["overflow_mode"], "hardware.ascend.overflow_mode", ASCEND_OVERFLOW_MODES)


def check_devices(hardware: Mapping[str, Any]) -> None:
    """This machine has the configured device (dry runs plan for other machines and skip this)."""
    target = hardware.get("device_target", "CPU")
    if hardware.get("dry_run") or devices_present(target):
        return
    raise ConfigError(f"hardware={hardware.get('name')} needs {target} devices, and this machine has none "
                      f"({DEVICE_FILES[target]} not found): use hardware=cpu, or hardware.dry_run=true to only "
                      "print the launch plan")


DEVICE_FILES = {"CPU": "", "GPU": "/dev/nvidia*", "Ascend": "/dev/davinci*"}


def devices_present(target: str) -> bool:
    """Whether the device nodes of `target` exist (the CPU always does)."""
    return target == "CPU" or bool(glob.glob(DEVICE_FILES[target]))


def _is_loopback(address: str) -> bool:
    if address in ("localhost", "None", ""):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False
