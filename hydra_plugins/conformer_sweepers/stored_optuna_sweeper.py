"""`StoredOptunaSweeper`: Hydra's Optuna sweeper for a study stored in SQLite (sweeps/optuna_lr.yaml).

- `n_trials` counts the whole study: the same command run again after an interruption runs only the trials
  still missing (a complete study runs none and reports again).
- Run dirs are named by the study's trial numbers, so they continue across runs and stay distinct between workers.
- Several sweep processes (on one machine or many) can work on one study: each runs a batch of `n_jobs` trials at a
  time (in parallel with `hydra/launcher=joblib`) until the study holds `n_trials`, counting the others' trials.
- The sampler's seed is offset by the trials already in the study, so a continued study does not draw its first
  trials again.
- The study keeps the sweep's MLflow parent run id, which the continued sweep reuses (conformer.sweeps.callback).
"""
from __future__ import annotations

import logging
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from conformer.sweeps.optuna_store import (
    PARENT_ATTR,
    continue_study,
    directions,
    mark_worker,
    open_storage,
    trials_to_run,
)

log = logging.getLogger(__name__)


class StoredOptunaSweeper(Sweeper):
    """Takes the options of hydra-optuna-sweeper's OptunaSweeper, which it drives."""

    def __init__(self, **options: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self._optuna = OptunaSweeper(**{**options, "storage": open_storage(options.get("storage"))})
        self._config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._config = config
        self._optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        from conformer.sweeps.callback import sweep_parent_run_id

        impl = self._optuna.sweeper
        if not (impl.study_name and impl.storage is not None):
            return self._optuna.sweep(arguments)
        study = optuna.create_study(study_name=impl.study_name, storage=impl.storage,
                                    directions=directions(impl.direction), load_if_exists=True)
        n_trials = impl.n_trials
        impl.job_idx, _ = continue_study(study, n_trials)
        sampler = self._config.hydra.sweeper.sampler
        if impl.job_idx and sampler.get("seed") is not None and not sampler.get("_partial_", False):
            impl.sampler = instantiate(sampler, seed=int(sampler.seed) + impl.job_idx)
        parent = sweep_parent_run_id(self._config.hydra.sweep.dir)
        if parent:
            study.set_user_attr(PARENT_ATTR, parent)
        if trials_to_run(study, n_trials) == 0 and not any(t.state.name == "COMPLETE" for t in study.trials):
            log.warning("optuna study %s: its %d trials are running in other workers: nothing to run here",
                        study.study_name, n_trials)
            return None
        numbers = _number_trials_by_the_study(impl)
        # One batch of n_jobs trials at a time, recounted before each: other workers on the study take their share.
        batch, result = max(1, int(impl.n_jobs)), None
        while (to_go := trials_to_run(study, n_trials)) > 0 or result is None:
            impl.n_trials = min(batch, to_go)
            numbers.clear()
            result = self._optuna.sweep(arguments)
            if to_go == 0:
                break
        return result


def _number_trials_by_the_study(impl: Any) -> list[int]:
    """Make each job's run dir `<sweep dir>/<study trial number>` (and record the worker on the trial): numbers stay
    distinct when several workers share a study (and a sweep dir). Returns the list the numbers of a batch go to."""
    numbers: list[int] = []
    configure, launcher = impl._configure_trials, impl.launcher

    def configure_trials(trials: list[Any], *args: Any) -> Any:
        for trial in trials:
            mark_worker(trial)
        numbers.extend(trial.number for trial in trials)
        return configure(trials, *args)

    class NumberedLauncher:
        def __getattr__(self, name: str) -> Any:
            return getattr(launcher, name)

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            jobs = [[*overrides, f"hydra.sweep.subdir={number}"] for overrides, number in zip(job_overrides, numbers)]
            return launcher.launch(jobs, initial_job_idx=initial_job_idx)

    impl._configure_trials, impl.launcher = configure_trials, NumberedLauncher()
    return numbers
