"""Optuna studies in an RDB storage (SQLite, PostgreSQL, MySQL), so that the same sweep command continues an
interrupted study and several sweep processes, on one machine or many, work on one study at once.

Used by the sweeper `hydra_plugins.conformer_sweepers.StoredOptunaSweeper` (sweeps/optuna_lr.yaml) and by
`conformer.sweeps.callback.SweepParentCallback`, which finds the study's MLflow parent run in its user attributes.
Each trial records the sweep process that asked for it (host, pid, start time): a trial left RUNNING by a process
that is gone is one whose sweep was killed; one that another live worker runs is left to it.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the sweep's MLflow parent run
WORKER_ATTR = "conformer.worker"  # trial system attribute: "<host> <pid> <process start time>" of its sweep process
PARENT_WAIT_S = 60.0  # a worker joining a study its founder just created waits this long for the parent run id


def open_storage(storage: Any) -> Any:
    """The Optuna storage for `storage` (an RDB URL or a storage object): a storage object, so that no log line
    shows the URL's password. Its engine autocommits: optuna 2.10 never commits its schema stamp under SQLAlchemy 2,
    which leaves a new SQLite file locked and a new PostgreSQL database unstamped."""
    if not isinstance(storage, str):
        return storage
    from optuna.storages import RDBStorage

    if storage.startswith("sqlite:"):
        path = unquote(urlparse(storage).path)[1:]  # sqlite:////abs/optuna.db -> /abs/optuna.db
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    # postgresql://user:password@host/db, mysql+pymysql://...
    return RDBStorage(_with_installed_driver(storage), engine_kwargs={"isolation_level": "AUTOCOMMIT"})


def _with_installed_driver(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver (psycopg 3); with only psycopg2 installed (the project's
    `postgres` extra), name psycopg2 instead."""
    import importlib.util

    scheme, _, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None and \
            importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def load_study(storage: Any, study_name: str) -> Any | None:
    """The stored study `study_name`; None when there is none yet."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # optuna: "Record does not exist."
        return None


def stored_parent_run_id(sweeper_cfg: Mapping[str, Any], wait_s: float = PARENT_WAIT_S) -> str | None:
    """The MLflow parent run of the stored study this sweeper config continues; None for a new or in-memory one.

    Creating the study decides who opens the parent when workers start together: the one that created it (None
    here) opens it and records it on the study; the others wait up to `wait_s` for that record."""
    import optuna

    storage, name = sweeper_cfg.get("storage"), sweeper_cfg.get("study_name")
    if not storage or not name:
        return None
    storage = open_storage(storage)
    try:
        optuna.create_study(study_name=name, storage=storage, directions=directions(sweeper_cfg.get("direction")))
        return None  # this worker founded the study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    deadline = time.monotonic() + wait_s
    while True:
        study = optuna.load_study(study_name=name, storage=storage)
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent or study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            return parent  # an older study without a parent (tracking was off) gets one now
        time.sleep(0.5)


def mark_worker(trial: Any) -> None:
    """Record on `trial` the sweep process that runs it."""
    import psutil

    trial.set_system_attr(WORKER_ATTR, f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.3f}")


def worker_gone(trial: Any) -> bool:
    """A RUNNING trial whose sweep process is gone: on this host and dead, or recorded by no worker (a sweep of an
    older version). Another host's worker cannot be seen from here: it counts as alive."""
    import psutil

    host, pid, started = (str(trial.system_attrs.get(WORKER_ATTR, "")).split() + ["", "", ""])[:3]
    if not host:
        return True
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) > 1.0
    except (psutil.Error, ValueError):
        return True


def trials_to_run(study: Any, n_trials: int) -> int:
    """Trials still missing for the study to hold `n_trials` done or running ones (any worker's)."""
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return max(0, n_trials - sum(trial.state in counted for trial in study.get_trials(deepcopy=False)))


def directions(direction: Any) -> list[str]:
    """"maximize", Direction.maximize or a list of them -> ["maximize", ...]."""
    items = list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
    return [getattr(item, "name", item) for item in items]


def continue_study(study: Any, n_trials: int) -> tuple[int, int]:
    """Prepare `study` for a run that completes it to `n_trials` trials: trials left RUNNING by a killed sweep
    become FAIL (those of live workers keep running). Returns (number of the next trial, trials still to run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING and worker_gone(trial):
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning("optuna study %s: trial %d was left running (sweep killed?): marked FAIL",
                        study.study_name, trial.number)
    to_go = trials_to_run(study, n_trials)
    if trials:
        log.info("optuna study %s continues: %d trials done or running, %d to go", study.study_name,
                 n_trials - to_go, to_go)
    return len(trials), to_go
