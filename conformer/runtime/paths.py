"""Where the project lives: the one place that decides the project root (mlflow.db, outputs/, .cache/)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT_ENV = "CONFORMER_PROJECT_ROOT"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # conformer/


def checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install), recognised by its conf/ and run.py."""
    root = PACKAGE_DIR.parent
    return root if (root / "conf").is_dir() and (root / "run.py").is_file() else None


def project_root() -> Path:
    """env CONFORMER_PROJECT_ROOT if set, else the checkout, else the current directory."""
    configured = os.environ.get(PROJECT_ROOT_ENV)
    return Path(configured).expanduser().resolve() if configured else (checkout_root() or Path.cwd()).resolve()


def git_commit(path: Path | str) -> str | None:
    """HEAD commit of the git work tree containing `path`, or None (no git, not a repository)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def register_resolvers() -> None:
    """`${project_root:}` in the configs (conf/config.yaml: paths.root)."""
    OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)
