"""The application behind run.py: validate, set up the hardware (or launch the workers), run the selected task.

Nothing here imports MindSpore at module level: the config is checked before the device, the tasks and their
graphs are loaded.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from omegaconf import DictConfig

from conformer.config.validation import check_tracking_store, component_error, validate_config
from conformer.models.registry import model_name
from conformer.runtime import compile_cache
from conformer.runtime.hardware import configure_device, in_launcher, world_size
from conformer.runtime.hardware_checks import check_devices
from conformer.runtime.logs import file_logging
from conformer.runtime.rundir import check_run_dir
from conformer.runtime.signals import interruptible
from conformer.secrets import redact
from conformer.sweeps.launch import TrialSlot, in_trial_process, run_trial_process
from conformer.vocabulary import TASKS

if TYPE_CHECKING:
    from conformer.tasks.common import RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Relaunch:
    """How msrun (or a parallel sweep's trial process) re-runs this program: the script and its arguments (same
    config, this run's dir); `trial`: this job's slot in a parallel sweep, which runs it in a process of its own."""

    script: Path
    args: Sequence[str]
    trial: TrialSlot | None = None


def task_function(name: str) -> Callable[[RunContext], float | None]:
    """The function that runs task `name` (`conformer.vocabulary.TASKS`); importing it imports MindSpore and MLflow."""
    module, _, function = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def run(cfg: DictConfig, run_dir: Path, relaunch: Relaunch | None = None, only_task: bool = False) -> float | None:
    """Run `cfg.task` in `run_dir`; returns the task's objective (the monitored metric for training).

    With a multi-worker `hardware` in a plain process, start the workers under msrun instead (`relaunch` says
    how) and return rank 0's objective; a parallel sweep's job runs its trial in a child process the same way.
    `hardware.dry_run=true` only prints the msrun command line. `only_task`: this process runs this one task and
    nothing else, so a training may load its graphs from the compile cache.
    """
    validate_config(cfg)
    check_run_dir(run_dir)
    check_devices(cfg.hardware)
    check_tracking_store(cfg)
    if in_launcher() and (world_size(cfg.hardware) > 1 or cfg.hardware.get("dry_run")):
        with interruptible():
            return launch_workers(cfg, run_dir, relaunch)
    if relaunch is not None and relaunch.trial is not None and in_launcher():
        return run_trial_process(cfg, run_dir, relaunch.script, relaunch.args, relaunch.trial)
    group = configure_device(cfg.hardware)
    if only_task and cfg.task.name == "train":
        compile_cache.allow(group.rank if group.distributed else None)
    from conformer.tasks.common import RunContext, resolved_yaml, seed_everything
    from conformer.train.graphs import start_run

    run_dir.mkdir(parents=True, exist_ok=True)
    with file_logging(run_dir, group.rank), interruptible():
        if group.is_main:  # the whole config is in .hydra/ and MLflow's config.yaml: one line on the console
            log.info("task=%s model=%s data=%s hardware=%s | run dir %s", cfg.task.name, model_name(cfg.model),
                     cfg.data.name, cfg.hardware.name, run_dir)
            log.debug("composed config:\n%s", resolved_yaml(cfg))
        seed_everything(int(cfg.seed))
        ctx = RunContext(cfg=cfg, run_dir=run_dir, project_root=Path(cfg.paths.root), group=group)
        task = task_function(cfg.task.name)  # imports the tasks (MindSpore, MLflow)
        start_run()  # frees an earlier task's cells (a sweep's trials), freezes the rest out of later collections
        try:
            objective = task(ctx)
        except InstantiationException as err:
            raise component_error(err) from err
        compile_cache.finish()  # a finished task's graphs are complete: the next run of this config loads them
    if (group.distributed or in_trial_process()) and group.is_main:
        from conformer.runtime.launch import write_result

        write_result(run_dir, objective)
    return objective


def launch_workers(cfg: DictConfig, run_dir: Path, relaunch: Relaunch | None) -> float | None:
    """The parent of a multi-worker job: msrun re-runs `relaunch`; rank 0's objective comes back."""
    from conformer.errors import LaunchError
    from conformer.runtime.launch import launch, plan_launch
    from conformer.tracking import end_unfinished_runs

    hardware = cfg.hardware
    if world_size(hardware) == 1:
        print(f"hardware={hardware.name} runs in this process (1 worker): nothing to launch with msrun")
        return None
    if relaunch is None:
        raise LaunchError(f"hardware={hardware.name} needs {world_size(hardware)} workers: start it with "
                          "`python run.py ...` (it re-launches itself under msrun)")
    plan = plan_launch(hardware, relaunch.script, relaunch.args, run_dir)
    if hardware.get("dry_run"):
        print(redact(plan.describe()))  # the workers' overrides may hold a tracking URI's password
        return None
    root = Path(cfg.paths.root)
    return launch(plan, lambda status, reason: end_unfinished_runs(cfg.tracking, root, plan.run_dir, status,
                                                                   reason))
