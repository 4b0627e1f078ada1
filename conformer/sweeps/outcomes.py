"""Failed trials, marked in their run dirs: the sweep's own process counts them (and exits non-zero) also when other
processes ran the trials (a parallel launcher's workers, whose memory it cannot see) or tracking is off."""
from __future__ import annotations

from pathlib import Path

FAILED_FILE = "trial_failed.txt"


def record_failure(run_dir: Path, message: str) -> None:
    """Mark the trial of `run_dir` failed, with the one line that says why."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).write_text(message + "\n")


def failed_in(sweep_dir: Path | str) -> int:
    """How many trials under `sweep_dir` failed."""
    folder = Path(sweep_dir)
    return sum(1 for _ in folder.rglob(FAILED_FILE)) if folder.is_dir() else 0
