"""Errors run.py turns into one line, kept free of heavy imports (MLflow, MindSpore) so that it can catch them."""
from __future__ import annotations


class TrackingUnavailable(RuntimeError):
    """The tracking store does not answer; the message is one line naming the store and the ways out."""

    def __init__(self, uri: str, reason: str) -> None:
        from conformer.secrets import redact  # the user info of the URI is a secret

        self.uri, self.reason = redact(uri), redact(reason)
        uri, reason = self.uri, self.reason
        super().__init__(f"MLflow tracking store {uri} is unreachable ({reason}): start it, point tracking.uri "
                         "(or MLFLOW_TRACKING_URI) at one that answers, set tracking.fallback_to_local=true to log "
                         "to the local store, or run with tracking=disabled")
