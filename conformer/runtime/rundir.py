"""A run dir that cannot be written is one `config error:` line, before Hydra tries to make it (Hydra's own failure
is a long traceback): a Hydra callback, run when a single run starts (conf/config.yaml: hydra.callbacks)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from conformer.errors import ConfigError


def check_run_dir(run_dir: Path) -> None:
    """The run dir (and its checkpoints/) can be written: found now, not after the first epoch."""
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run dir {run_dir}: {existing} is not a writable folder; set "
                          "hydra.run.dir (or paths.root) to a folder you can write")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not (checkpoints.is_dir() and os.access(checkpoints, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot write checkpoints to {checkpoints}: make it a writable folder")


class WritableRunDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from conformer.secrets import redact

        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_missing=False)
        except Exception:  # noqa: BLE001  (an interpolation only Hydra's job can resolve: Hydra checks it then)
            return
        if not run_dir:
            return
        try:
            check_run_dir(Path(str(run_dir)))
        except ConfigError as err:
            print(redact(err.line()), file=sys.stderr)
            sys.exit(err.exit_code)
