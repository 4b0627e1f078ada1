"""What a sweep's summary reads from the store (its parent's child runs) and the runs-table view it shares."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conformer.tracking.store import REQUEST_TIMEOUT_S, search_all_runs, short_requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildRun:
    """One trial's run: `best` is the best value of the monitored metric over its history (None: never logged),
    first reached at `best_step`."""

    run_id: str
    name: str
    status: str
    start_ms: int
    end_ms: int | None
    tags: dict[str, str] = field(default_factory=dict)
    best: float | None = None
    best_step: int | None = None


def child_runs(uri: str, parent_run_id: str, monitor: str, mode: str) -> list[ChildRun]:
    """The runs nested under `parent_run_id` in the store `uri`, with the best `monitor` value each reached
    (`mode` "max" or "min")."""
    client = MlflowClient(tracking_uri=uri)
    sign = -1.0 if mode == "max" else 1.0
    children = []
    for run in search_all_runs(client, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            history = client.get_metric_history(run.info.run_id, monitor)
        best = min(history, key=lambda m: (sign * m.value, m.step), default=None)
        children.append(ChildRun(run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
                                 run.info.end_time, dict(run.data.tags), None if best is None else best.value,
                                 None if best is None else best.step))
    return children


def name_parent_uniquely(uri: str, experiment_id: str, run_id: str, name: str) -> str:
    """`name` for the sweep parent `run_id`, or `<name> <run id's first 6>` (the run renamed so) when another
    sweep parent of the experiment has it: two sweeps started in the same second, or one named by hand twice.
    Each of two parents that see each other takes its own suffix, so neither name is shared."""
    client = MlflowClient(tracking_uri=uri)
    with short_requests(REQUEST_TIMEOUT_S, retries=2):
        parents = client.search_runs([experiment_id], filter_string="tags.sweep = 'parent'", max_results=50000)
        if not any(run.info.run_name == name and run.info.run_id != run_id for run in parents):
            return name
        unique = f"{name} {run_id[:6]}"
        client.update_run(run_id, name=unique)
    log.info("another sweep parent is named %r: this one is %r", name, unique)
    return unique


VIEW_KEY = "sweeps"  # MLflow UI: <ui>/#/experiments/<id>/runs?viewStateShareKey=sweeps&workflowType=...
VIEW_TAG = "mlflow.sharedViewState."  # the experiment tag the UI reads a shared runs-table view from


def share_runs_view(uri: str, experiment_id: str, objective: str, params: list[str], mode: str = "max") -> str:
    """Store a runs-table view of the experiment: runs grouped by their sweep (tag `sweep.parent`, the parent run's
    name; each group row shows its best value), best first inside each group, the swept `params` and the `objective`
    metric as the first columns. Returns its URL path, in MLflow 3's model-training mode ("" when the store refused
    it: a convenience, the sweep goes on). The UI keeps column choices per browser: this view is the way to share
    them. MLflow nests children under their parent only in its start-time order, so a sweep's trials are grouped."""
    view = {"orderByKey": f"metrics.`{objective}`", "orderByAsc": mode == "min",
            "selectedColumns": [*(f"params.`{key}`" for key in params), f"metrics.`{objective}`"],
            "groupBy": {"aggregateFunction": mode, "groupByKeys": [{"mode": "tag", "groupByData": "sweep.parent"}]}}
    try:
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            MlflowClient(tracking_uri=uri).set_experiment_tag(experiment_id, VIEW_TAG + VIEW_KEY, json.dumps(view))
    except MlflowException as err:
        log.warning("could not store the sweep's runs-table view in experiment %s: %s", experiment_id, err)
        return ""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def ui_hint(uri: str, path: str) -> str:
    """Where to open `path` of the MLflow UI for the store `uri`."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path} (after: mlflow ui --backend-store-uri {uri})"
