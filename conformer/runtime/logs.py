"""Log records of a run into files of its run dir: `train.log` for rank 0, `worker_<rank>.log` for the others."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conformer.secrets import redact_handlers

LOG_FILE = "train.log"


def log_path(run_dir: Path, rank: int = 0) -> Path:
    return run_dir / (LOG_FILE if rank == 0 else f"worker_{rank}.log")


@contextmanager
def file_logging(run_dir: Path, rank: int = 0) -> Iterator[Path]:
    """Send this process's log records to `log_path(run_dir, rank)` for one run.

    The handler is closed afterwards, so runs in one process (tests, sweeps with the basic launcher) do not write
    into each other's logs; a file that already has a handler gets no second one.
    """
    path = log_path(run_dir, rank)
    root = logging.getLogger()
    before = set(root.handlers)
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in before):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    redact_handlers(root)  # no URI's user info in any log line (console, train.log)
    try:
        yield path
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
