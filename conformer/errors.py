"""Errors run.py turns into one line, kept free of heavy imports (MLflow, MindSpore) so that it can catch them."""
from __future__ import annotations

import errno


class TrackingUnavailable(RuntimeError):
    """The tracking store does not answer; the message is one line naming the store and the ways out."""

    def __init__(self, uri: str, reason: str) -> None:
        from conformer.secrets import redact  # the user info of the URI is a secret

        self.uri, self.reason = redact(uri), redact(reason)
        uri, reason = self.uri, self.reason
        super().__init__(f"MLflow tracking store {uri} is unreachable ({reason}): start it, point tracking.uri "
                         "(or MLFLOW_TRACKING_URI) at one that answers, set tracking.fallback_to_local=true to log "
                         "to the local store, or run with tracking=disabled")


class PreflightFailed(RuntimeError):
    """A check of `task=preflight` failed; the message names the checks (the table above it says more)."""

    exit_code = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, not a checkpoint): one line naming it."""


class InsufficientSpace(OSError):
    """Found before training: the run dir's file system cannot hold the checkpoints."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"  # =1: the errors run.py makes one line are raised with their traceback


def one_line(err: BaseException) -> str | None:
    """The one line run.py prints (and logs to train.log) for a fault of the run, not of the code: a checkpoint it
    cannot read, a loss that is not finite, a disk that is full, a folder it cannot write; None for any other
    exception (a bug: its traceback is shown)."""
    if isinstance(err, InsufficientSpace):
        return f"error: {err.strerror}"
    if isinstance(err, CheckpointError):
        return f"error: {err}"
    if isinstance(err, FloatingPointError):
        return f"error: {err}"
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        where = f" writing {err.filename}" if err.filename else ""
        return (f"error: no space left on the device{where}: free some space, then continue the training with "
                "trainer.resume=auto (its last finished epoch is kept)")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = f" {err.filename}" if err.filename else ""
        return (f"error: cannot write{where} ({err.strerror}): point hydra.run.dir (or paths.root) at a folder you "
                "can write")
    return None
