"""`StoredOptunaSweeper`: Hydra's Optuna sweeper for a study stored in SQLite (sweeps/optuna_lr.yaml).

- `n_trials` counts the whole study: the same command run again after an interruption runs only the trials
  still missing (a complete study runs none and reports again).
- Job numbers are the study's trial numbers, so they continue across runs (run dirs, the trials table).
- The sampler's seed is offset by the trials already in the study, so a continued study does not draw its first
  trials again.
- The study keeps the sweep's MLflow parent run id, which the continued sweep reuses (conformer.sweeps.callback).
"""
from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from conformer.sweeps.optuna_store import PARENT_ATTR, continue_study, directions, open_storage


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
        if impl.study_name and impl.storage is not None:
            study = optuna.create_study(study_name=impl.study_name, storage=impl.storage,
                                        directions=directions(impl.direction), load_if_exists=True)
            impl.job_idx, impl.n_trials = continue_study(study, impl.n_trials)
            sampler = self._config.hydra.sweeper.sampler
            if impl.job_idx and sampler.get("seed") is not None and not sampler.get("_partial_", False):
                impl.sampler = instantiate(sampler, seed=int(sampler.seed) + impl.job_idx)
            parent = sweep_parent_run_id(self._config.hydra.sweep.dir)
            if parent:
                study.set_user_attr(PARENT_ATTR, parent)
        return self._optuna.sweep(arguments)
