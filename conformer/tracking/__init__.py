"""MLflow run tracking: the only package of the project that talks to MLflow.

`Tracker` (tracker.py) wraps one MLflow run through an explicit `MlflowClient` (no fluent global state), so trackers
and processes never interfere. As a context manager it always ends its run: FINISHED on success, KILLED on
KeyboardInterrupt (Ctrl-C and SIGTERM arrive as one, see conformer.runtime.signals), FAILED otherwise; an exit hook
ends a run the program left open, and the next start on the host ends the runs of killed processes (store.py).
A store that goes down mid-run does not stop the training: the logging calls return at once, a background thread
sends them in order and keeps them while the store fails (outbox.py); an HTTP(S) store that does not answer when the
run starts is `TrackingUnavailable` (one line), or the run goes to the local SQLite store with
`tracking.fallback_to_local`. `NullTracker` (rank > 0, tracking off) has the same methods and does nothing.
What runs are compared by (their names, params, the user's tags, dataset inputs) is summary.py; MLflow's system
metrics, through the same outbox, system_metrics.py.
Non-finite metric values are dropped with a warning (SQLite turns inf into 1.8e308, which flattens every chart); the
tag `nonfinite.<key>` records the first such step.
"""
from conformer.tracking.store import (
    TrackingUnavailable,
    close_runs_of_dead_processes,
    default_artifact_root,
    default_tracking_uri,
    end_unfinished_runs,
    local_weights,
    resolve_tracking_uri,
    run_checkpoint,
)
from conformer.tracking.summary import comparable_params, default_run_name, image_dataset, user_tags
from conformer.tracking.tracker import NullTracker, Tracker, create_tracker
from conformer.tracking.values import flatten_config, run_tags

__all__ = ["NullTracker", "Tracker", "TrackingUnavailable", "close_runs_of_dead_processes", "comparable_params",
           "create_tracker", "default_artifact_root", "default_run_name", "default_tracking_uri", "end_unfinished_runs",
           "flatten_config", "image_dataset", "local_weights", "resolve_tracking_uri", "run_checkpoint", "run_tags",
           "user_tags"]
