"""The project's errors: each knows the one line a user reads and the exit status run.py ends with.

A leaf module (no MindSpore, no MLflow) so that anything can raise them and run.py can catch them before the heavy
imports. `failure(err)` is the one place that turns an exception into (line, exit status); None means a bug, whose
traceback is shown.
"""
from __future__ import annotations

import errno
import signal
from typing import NamedTuple

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"  # =1: the errors run.py makes one line are raised with their traceback
STORE_WAYS_OUT = ("start it, point tracking.uri (or MLFLOW_TRACKING_URI) at one that answers, set "
                  "tracking.fallback_to_local=true to log to the local store, or run with tracking=disabled")


class ConformerError(Exception):
    """A fault of the run, not of the code: its message is the line the user reads, after `prefix`."""

    exit_code = 1
    prefix = "error"
    traceback_helps = False  # True: HYDRA_FULL_ERROR=1 shows its traceback (where the line may not say enough)

    def line(self) -> str:
        return f"{self.prefix}: {self}"


class ConfigError(ConformerError, ValueError):
    """The composed config cannot work; the message says which key and how to fix it."""

    exit_code = 2
    prefix = "config error"


class LaunchError(ConformerError, RuntimeError):
    """The distributed job failed or was interrupted; `exit_code` is what the launcher exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrackingUnavailable(ConformerError, RuntimeError):
    """The tracking store does not answer; the message is one line naming the store and the ways out."""

    def __init__(self, uri: str, reason: str) -> None:
        from conformer.secrets import redact  # the user info of the URI is a secret

        self.uri, self.reason = redact(uri), redact(reason)
        super().__init__(f"MLflow tracking store {self.uri} is unreachable ({self.reason}): {STORE_WAYS_OUT}")


class PreflightFailed(ConformerError, RuntimeError):
    """A check of `task=preflight` failed; the message names the checks (the table above it says more)."""


class CheckpointError(ConformerError, ValueError):
    """A checkpoint file that cannot be read (empty, truncated, not a checkpoint): one line naming it."""

    traceback_helps = True


class InsufficientSpace(ConformerError, OSError):
    """Found before training: the run dir's file system cannot hold the checkpoints."""

    traceback_helps = True

    def line(self) -> str:
        return f"{self.prefix}: {self.strerror}"


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; `exit_code` is the shell convention 128 + signal number (130, 143, 129).

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        return f"interrupted ({self})"


class Failure(NamedTuple):
    line: str
    exit_code: int
    traceback_helps: bool = True


def failure(err: BaseException) -> Failure | None:
    """The line and exit status of a fault of the run (the project's errors, a loss that is not finite, a full
    disk, a folder it cannot write); None for any other exception (a bug: its traceback is shown)."""
    if isinstance(err, ConformerError):
        return Failure(err.line(), err.exit_code, err.traceback_helps)
    if isinstance(err, Interrupted):
        return Failure(err.line(), err.exit_code, False)
    if isinstance(err, FloatingPointError):
        return Failure(f"error: {err}", 1)
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        where = f" writing {err.filename}" if err.filename else ""
        return Failure(f"error: no space left on the device{where}: free some space, then continue the training "
                       "with trainer.resume=auto (its last finished epoch is kept)", 1)
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = f" {err.filename}" if err.filename else ""
        return Failure(f"error: cannot write{where} ({err.strerror}): point hydra.run.dir (or paths.root) at a "
                       "folder you can write", 1)
    return None
