"""Entry point: `python run.py [overrides]` (single run) or `python run.py -m [sweep overrides]`."""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import conformer  # noqa: F401  (process defaults MindSpore needs, the ${project_root:} resolver)

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
# Hydra settings of the parent that msrun workers must not inherit (they run one job in the parent's dir).
PARENT_ONLY = ("hydra.mode", "hydra.run.", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher",
               "hydra/launcher", "hydra.output_subdir", "hydra.job_logging.handlers.file")
PARENT_ONLY_TASK = ("hardware.dry_run", "sweep=", "sweep/")


def _override_value(path: Path) -> str:
    """`path` as a Hydra override value: quoted when it holds characters the override grammar reserves."""
    text = str(path)
    return text if re.fullmatch(r"[\w/.@+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def worker_args(hydra_cfg: DictConfig, run_dir: Path) -> list[str]:
    """Arguments that make an msrun worker compose this run's config and share its run dir.

    Workers write no `.hydra/` (the parent did) and log through their own files (`train.log` for rank 0,
    `worker_<rank>.log` for the others, see conformer.runtime.logs), not through Hydra's file handler.
    """
    args = []
    if hydra_cfg.job.config_name != "config":
        args.append(f"--config-name={hydra_cfg.job.config_name}")
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "main" and source.schema == "file" and Path(source.path) != CONFIG_DIR:
            args.append(f"--config-path={source.path}")
        elif source.provider == "command-line":
            args.append(f"--config-dir={source.path}")
    args += [o for o in hydra_cfg.overrides.task if not o.lstrip("~+").startswith(PARENT_ONLY_TASK)
             and not _secret_uri_to_environment(o)]
    args += [o for o in hydra_cfg.overrides.hydra if not o.lstrip("~+").startswith(PARENT_ONLY)]
    return args + [f"hydra.run.dir={_override_value(run_dir)}", "hydra.output_subdir=null",
                   f"hydra.job_logging.handlers.file.filename={os.devnull}"]


def _secret_uri_to_environment(override: str) -> bool:
    """A `tracking.uri=` override with user info (a password) goes to the workers as MLFLOW_TRACKING_URI, which they
    read when tracking.uri is unset, not on their command line (msrun prints and logs it): True when it did."""
    from conformer.secrets import has_secret

    key, sep, value = override.partition("=")
    if not sep or key.lstrip("~+") != "tracking.uri" or not has_secret(value):
        return False
    os.environ["MLFLOW_TRACKING_URI"] = value.strip("'\"")  # the launcher runs no MindSpore threads yet
    return True


def sweep_parent(cfg: DictConfig, hydra_cfg: DictConfig) -> list[str]:
    """In a multirun trial: nest the trial's MLflow run under the sweep's parent run; the override that tells the
    msrun workers the same."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return []
    from conformer.sweeps.callback import sweep_parent_run_id

    parent = sweep_parent_run_id(hydra_cfg.sweep.dir)
    if parent is None:
        return []
    cfg.tracking.parent_run_id = parent
    return [f"tracking.parent_run_id={parent}"]


def remove_unused_run_dir(run_dir: Path) -> None:
    """A run stopped by a config check leaves no run dir behind (Hydra made it, with .hydra/, before the checks)."""
    log_file = run_dir / "train.log"
    unused = {path.name for path in run_dir.iterdir()} <= {".hydra", "train.log"} if run_dir.is_dir() else False
    if unused and (not log_file.exists() or log_file.stat().st_size == 0):
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from conformer.app import Relaunch, run
    from conformer.errors import FULL_ERROR_ENV, ConfigError, Interrupted, failure
    from conformer.secrets import redact, redact_files, redact_handlers
    from conformer.sweeps.launch import trial_slot

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    redact_handlers()  # Hydra's console and train.log handlers: no URI's user info in a log line
    redact_files([*run_dir.glob(".hydra/*.yaml"), Path(hydra_cfg.sweep.dir) / "multirun.yaml"])  # Hydra wrote them
    relaunch = Relaunch(Path(__file__).resolve(), worker_args(hydra_cfg, run_dir) + sweep_parent(cfg, hydra_cfg),
                        trial=trial_slot(hydra_cfg))
    try:
        return run(cfg, run_dir, relaunch, only_task=hydra_cfg.mode == RunMode.RUN)
    except (Exception, Interrupted) as err:
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(err, Interrupted):  # recorded; the sweep goes on
            from conformer.sweeps.callback import fail_trial

            print(redact(f"trial {hydra_cfg.job.num} failed: {err}".splitlines()[0]), file=sys.stderr)
            return fail_trial(cfg, run_dir, err, overrides=list(hydra_cfg.overrides.task))
        fault = failure(err)
        if fault is None or (fault.traceback_helps and os.environ.get(FULL_ERROR_ENV) == "1"):
            raise  # a bug, or its traceback asked for
        hint = f" ({FULL_ERROR_ENV}=1 shows the traceback)" if fault.traceback_helps else _next_step(err, run_dir)
        _report(fault.line + hint, log_to_file=fault.traceback_helps)
        if isinstance(err, ConfigError):
            remove_unused_run_dir(run_dir)
        if isinstance(err, Interrupted):
            from conformer.runtime.signals import exit_within

            exit_within(fault.exit_code)
        sys.exit(fault.exit_code)


def _next_step(err: BaseException, run_dir: Path) -> str:
    """How to continue an interrupted training (the error cannot know its run dir)."""
    from conformer.errors import Interrupted

    if not isinstance(err, Interrupted):
        return ""
    last = run_dir / "checkpoints" / "last.ckpt"
    return f": continue with trainer.resume={last}" if last.is_file() else f": run dir {run_dir}"


def _report(line: str, log_to_file: bool) -> None:
    """The error's one line on stderr, and in train.log too (written by the file handlers, once)."""
    from conformer.secrets import redact

    if log_to_file:
        record = logging.LogRecord("run", logging.ERROR, __file__, 0, redact(line), None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    print(redact(line), file=sys.stderr)


def sweep_group_argument(args: list[str]) -> list[str]:
    """`+sweep=<name>` means `sweep=<name>` (config.yaml already lists the group, so Hydra would refuse the +)."""
    return [arg[1:] if arg.startswith("+sweep=") else arg for arg in args]


if __name__ == "__main__":
    sys.argv[1:] = sweep_group_argument(sys.argv[1:])
    main()
    from conformer.sweeps.callback import failed_trials

    if failed_trials():  # a sweep ran all its trials, and some failed
        print(f"{failed_trials()} trial(s) failed", file=sys.stderr)
        sys.exit(1)
