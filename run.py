"""Entry point: `python run.py [overrides]` (single run) or `python run.py -m [sweep overrides]`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent
os.environ["CONFORMER_CODE_DIR"] = str(CODE_DIR)  # conf/ and sweeps/ (Hydra's search path)
os.environ.setdefault("CONFORMER_PROJECT_ROOT", str(CODE_DIR))  # mlflow.db, outputs/, .cache/
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # must precede MindSpore's first CPU convolution
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings drown the progress lines

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from conformer.app import run
    from conformer.validation import ConfigError

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
