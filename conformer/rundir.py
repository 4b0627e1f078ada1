"""A run dir that cannot be written is one `config error:` line, before Hydra tries to make it (Hydra's own failure
is a long traceback): a Hydra callback, run when a single run starts (conf/config.yaml: hydra.callbacks)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class WritableRunDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from conformer.secrets import redact
        from conformer.validation import ConfigError, check_run_dir

        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_missing=False)
        except Exception:  # noqa: BLE001  (an interpolation only Hydra's job can resolve: Hydra checks it then)
            return
        if not run_dir:
            return
        try:
            check_run_dir(Path(str(run_dir)))
        except ConfigError as err:
            print(redact(f"config error: {err}"), file=sys.stderr)
            sys.exit(2)
