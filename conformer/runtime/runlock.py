"""One owner per training: the live process holds an exclusive `flock` on `<run dir>/.owner` (its pid inside).

The kernel drops the lock when the process ends, however it ends (SIGKILL, OOM killer, power loss), so "is the
owner alive?" is "is the lock held?", with no clock or pid reuse involved. A training holds the lock of its own run
dir and, when it resumes, of the run dir it resumes from: a second `trainer.resume=auto` of a training in progress
finds one of them held and stops with one line naming the owner's pid (`RunInUse`). The stale-run check of the
tracking store (conformer.tracking.store) asks the same lock.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".owner"


class RunInUse(RuntimeError):
    """Another live process owns the run dir; the message names it and its pid."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder, self.pid = folder, pid
        owner = f"pid {pid}" if pid else "another process"
        super().__init__(f"the training in {folder} is in progress ({owner} owns it): wait for it to end or stop it"
                         f"{f' (kill {pid})' if pid else ''}, or train without trainer.resume")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive lock of one run dir, held until `release` (or the process's end)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise RunInUse(self.folder, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner(folder: Path | str) -> int | None | bool:
    """The pid owning run dir `folder` (0 when the owner is alive but unnamed); False when the run dir has a lock
    file that nobody holds (its owner ended); None when it has no lock file (not a training of this version)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
