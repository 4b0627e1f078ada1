"""Errors run.py turns into one line, kept free of heavy imports (MLflow, MindSpore) so that it can catch them."""
from __future__ import annotations


class TrackingUnavailable(RuntimeError):
    """The tracking store does not answer; the message is one line naming the store and the ways out."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = uri, reason
        super().__init__(f"MLflow tracking store {uri} is unreachable ({reason}): start it, point tracking.uri "
                         "(or MLFLOW_TRACKING_URI) at one that answers, set tracking.fallback_to_local=true to log "
                         "to the local store, or run with tracking=disabled")


class PreflightFailed(RuntimeError):
    """A check of `task=preflight` failed; the message names the checks (the table above it says more)."""

    exit_code = 1
