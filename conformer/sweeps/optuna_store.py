"""Optuna studies stored in SQLite, so that the same sweep command continues an interrupted study.

Used by the sweeper `hydra_plugins.conformer_sweepers.StoredOptunaSweeper` (sweeps/optuna_lr.yaml) and by
`conformer.sweeps.callback.SweepParentCallback`, which finds the study's MLflow parent run in its user attributes.
One sweep process per study: a trial left RUNNING in the study is one whose sweep was killed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the sweep's MLflow parent run


def open_storage(storage: Any) -> Any:
    """The Optuna storage for `storage` (a URL or a storage object). A SQLite URL gets an autocommit engine:
    optuna 2.10 never commits its schema stamp under SQLAlchemy 2, which leaves the file locked."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:"):
        return storage
    from optuna.storages import RDBStorage

    path = unquote(urlparse(storage).path)[1:]  # sqlite:////abs/optuna.db -> /abs/optuna.db
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return RDBStorage(storage, engine_kwargs={"isolation_level": "AUTOCOMMIT"})


def load_study(storage: Any, study_name: str) -> Any | None:
    """The stored study `study_name`; None when there is none yet."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # optuna: "Record does not exist."
        return None


def stored_parent_run_id(sweeper_cfg: Mapping[str, Any]) -> str | None:
    """The MLflow parent run of the stored study this sweeper config continues; None for a new or in-memory one."""
    storage, name = sweeper_cfg.get("storage"), sweeper_cfg.get("study_name")
    if not storage or not name:
        return None
    study = load_study(storage, name)
    return study.user_attrs.get(PARENT_ATTR) if study is not None else None


def directions(direction: Any) -> list[str]:
    """"maximize", Direction.maximize or a list of them -> ["maximize", ...]."""
    items = list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
    return [getattr(item, "name", item) for item in items]


def continue_study(study: Any, n_trials: int) -> tuple[int, int]:
    """Prepare `study` for a run that completes it to `n_trials` trials: trials left RUNNING by a killed sweep
    become FAIL. Returns (number of the next trial, trials still to run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning("optuna study %s: trial %d was left running (sweep killed?): marked FAIL",
                        study.study_name, trial.number)
    done = sum(trial.state in (TrialState.COMPLETE, TrialState.PRUNED) for trial in trials)
    if trials:
        log.info("optuna study %s continues: %d trials done, %d to go", study.study_name, done,
                 max(0, n_trials - done))
    return len(trials), max(0, n_trials - done)
