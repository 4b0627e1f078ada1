"""Trials of a parallel sweep: Hydra's joblib launcher (local processes) or submitit (SLURM, or its local executor).

Such a launcher runs each job in a worker process of its own (loky's, submitit's). The job does not train there: it
checks its config, then runs the trial as one child `python run.py` with the job's overrides and its run dir (the
same arguments an msrun worker gets), and supervises it. The launcher's worker then outlives a trial process that is
killed (a dead loky worker would break the whole pool): the trial becomes a FAILED child run and the sweep goes on.

Each trial gets its share of the machine. Under joblib, trial k of `n_jobs` at once runs on device
`k mod hardware.devices` (`hardware.device_id`) on a GPU or Ascend config, and on the CPU its kernels use
cores // n_jobs threads (CONFORMER_KERNEL_THREADS); more jobs than devices is a config error unless
`hardware.share_devices=true`. Under submitit each job has its own allocation (SLURM's gres, cpus_per_task).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TRIAL_ENV = "CONFORMER_SWEEP_TRIAL"  # set in a trial process: it writes its objective into its run dir
THREADS_ENV = "CONFORMER_KERNEL_THREADS"  # the project's CPU kernels' threads (conformer/kernels/parallel.h)
STOP_GRACE_S = 10.0  # a stopped trial ends its MLflow run KILLED within this, else it is killed
PARALLEL_LAUNCHERS = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit", "SlurmLauncher": "submitit"}


@dataclass(frozen=True)
class TrialSlot:
    """Where a job of a parallel sweep runs: its job number, the launcher, how many jobs share this machine, and the
    kernel threads it gets (None: the process default)."""

    number: int
    launcher: str
    jobs: int
    threads: int | None


def launcher_kind(target: str | None) -> str | None:
    """"...JoblibLauncher" -> "joblib", submitit's -> "submitit"; None for a launcher that runs jobs in-process."""
    return PARALLEL_LAUNCHERS.get((target or "").rsplit(".", 1)[-1])


def concurrent_jobs(launcher_cfg: Mapping[str, Any]) -> int:
    """Jobs that run at once on this machine: joblib's n_jobs (-1: one per core, -2: all but one, ...); 1 for
    submitit (each job has its own allocation)."""
    if launcher_kind(launcher_cfg.get("_target_")) != "joblib":
        return 1
    n_jobs = int(launcher_cfg.get("n_jobs") or 1)
    return n_jobs if n_jobs > 0 else max(1, len(os.sched_getaffinity(0)) + 1 + n_jobs)


def trial_slot(hydra_cfg: DictConfig) -> TrialSlot | None:
    """This job's slot when a parallel launcher runs it (a multirun job in a launcher's worker); else None."""
    from hydra.types import RunMode

    launcher = OmegaConf.select(hydra_cfg, "launcher", default=None) or {}
    kind = launcher_kind(launcher.get("_target_"))
    if hydra_cfg.mode != RunMode.MULTIRUN or kind is None or os.environ.get(TRIAL_ENV):
        return None
    from conformer.runtime.launch import kernel_threads

    jobs = concurrent_jobs(launcher)
    # joblib: the cores divided among the jobs, as among msrun's workers; submitit: the allocation's
    threads = kernel_threads("CPU", jobs, False).get(THREADS_ENV) if kind == "joblib" else launcher.get("cpus_per_task")
    return TrialSlot(int(hydra_cfg.job.num), kind, jobs, None if threads is None else int(threads))


def device_count(hardware: Mapping[str, Any]) -> int:
    """The devices a parallel sweep spreads its trials over: `hardware.devices`, else every one this machine shows."""
    from conformer.runtime.hardware import local_devices

    return int(hardware.get("devices") or local_devices(hardware.get("device_target", "CPU")))


def check_parallel_devices(hardware: Mapping[str, Any], jobs: int) -> None:
    """ConfigError: more trials at once than devices on a GPU or Ascend config (unless `hardware.share_devices`)."""
    from conformer.errors import ConfigError

    target = hardware.get("device_target", "CPU")
    if target == "CPU" or jobs <= 1 or hardware.get("share_devices"):
        return
    devices = device_count(hardware)
    if jobs > devices:
        raise ConfigError(f"hydra.launcher.n_jobs={jobs} runs {jobs} trials at once on {devices} {target} "
                          f"device(s): lower n_jobs to {max(devices, 1)}, set hardware.devices, or let trials share "
                          "devices with hardware.share_devices=true")


def trial_resources(hardware: Mapping[str, Any], slot: TrialSlot) -> tuple[list[str], dict[str, str]]:
    """The overrides and environment that give the trial its share: a device of its own (joblib on a device
    config), its kernel threads on the CPU (unless the user set CONFORMER_KERNEL_THREADS)."""
    target = hardware.get("device_target", "CPU")
    overrides, env = [], {}
    if target != "CPU" and slot.launcher == "joblib":
        check_parallel_devices(hardware, slot.jobs)
        overrides.append(f"hardware.device_id={slot.number % max(1, device_count(hardware))}")
    user_threads = THREADS_ENV in os.environ or THREADS_ENV in (hardware.get("env") or {})
    if target == "CPU" and slot.threads is not None and not user_threads:
        env[THREADS_ENV] = str(slot.threads)
    env.update({str(k): str(v) for k, v in (hardware.get("env") or {}).items()})
    return overrides, env


def in_trial_process() -> bool:
    """This process is a parallel sweep's trial (it reports its objective through its run dir)."""
    return bool(os.environ.get(TRIAL_ENV))


def run_trial_process(cfg: DictConfig, run_dir: Path, script: Path, args: Sequence[str],
                      slot: TrialSlot) -> float | None:
    """Run the trial as a child `python <script> <args>` and return its objective; LaunchError when it fails or is
    killed (its MLflow run, left RUNNING, is ended FAILED). Stopped (Ctrl-C, SIGTERM), it stops the child first."""
    from conformer.runtime.launch import RESULT_FILE, LaunchError, WorkerExit, read_result
    from conformer.runtime.signals import interruptible, signals_ignored
    from conformer.tracking import end_unfinished_runs

    overrides, env = trial_resources(cfg.hardware, slot)
    result = run_dir / RESULT_FILE
    result.unlink(missing_ok=True)
    command = [sys.executable, str(script), *args, *overrides]
    log.info("trial %d: own process (%s)", slot.number,
             ", ".join([*overrides, *(f"{k}={v}" for k, v in env.items())]) or "process defaults")
    proc = subprocess.Popen(command, env={**os.environ, **env, TRIAL_ENV: str(slot.number)},
                            preexec_fn=_die_with_parent)
    try:
        with interruptible():
            code = proc.wait()
    except KeyboardInterrupt:
        with signals_ignored():
            _stop(proc)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code == 0 and result.is_file():
        return read_result(run_dir)
    reason = f"trial process {WorkerExit(proc.pid, code, None).describe().removeprefix('a worker ')}"
    end_unfinished_runs(cfg.tracking, Path(cfg.paths.root), run_dir, "FAILED", reason)
    raise LaunchError(reason, exit_code=code if code > 0 else 1)


def stop_trial_processes(grace_s: float = STOP_GRACE_S) -> None:
    """Stop what this (sweep) process started and left running: SIGTERM, then SIGKILL after `grace_s`."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, survivors = psutil.wait_procs(procs, timeout=grace_s)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=grace_s)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the trial ends its MLflow run KILLED), SIGKILL after STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher's worker dies (loky kills its workers on Ctrl-C), so no trial
    outlives its sweep."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ParallelTrialsCheck(Callback):
    """Before a parallel sweep starts (and before its MLflow parent run): its jobs fit the devices, one line if not."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from conformer.errors import ConfigError
        from conformer.secrets import redact

        launcher = OmegaConf.select(config, "hydra.launcher", default=None) or {}
        hardware = OmegaConf.select(config, "hardware", default=None)
        if launcher_kind(launcher.get("_target_")) is None or hardware is None:
            return
        try:
            check_parallel_devices(hardware, concurrent_jobs(launcher))
        except ConfigError as err:
            print(redact(f"config error: {err}"), file=sys.stderr)
            sys.exit(2)
