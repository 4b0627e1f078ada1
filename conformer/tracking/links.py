"""Runs that point at each other in a way the MLflow UI shows as links: an eval/export/predict run's description
(`mlflow.note.content`, markdown) links its training run; a registered model version carries its source run, its
val accuracy, its input format and the command that serves it (description and tags)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conformer.tracking.store import REQUEST_TIMEOUT_S, short_requests

log = logging.getLogger(__name__)


def run_path(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, relative to it (a markdown link in the UI opens it)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def training_link(client: MlflowClient, run_id: str) -> str:
    """Markdown naming the training run `run_id` as a link to it (its id alone when the store does not know it)."""
    try:
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            run = client.get_run(run_id)
    except MlflowException:
        return f"training run `{run_id}` (not in this store)"
    name = run.info.run_name or run_id
    best = {key: value for key, value in run.data.metrics.items() if key.startswith("best/")}
    shown = ", ".join(f"{key.removeprefix('best/')} {value:.2f}" for key, value in sorted(best.items())
                      if key != "best/epoch")
    return f"training run [{name}]({run_path(run.info.experiment_id, run_id)})" + (f" (best {shown})" if shown else "")


def describe_model_version(client: MlflowClient, name: str, version: str, *, source_run_id: str | None,
                           served_by: str, details: Mapping[str, Any]) -> None:
    """Description (markdown: the training run as a link, the serve command) and tags (`details`, the source run) of
    registered model `name` version `version`. Store errors warn: the model is registered either way."""
    lines = [f"Weights of the {training_link(client, source_run_id)}." if source_run_id else "",
             *(f"- {key}: {value}" for key, value in details.items()),
             "", f"Serve it with: `{served_by}`"]
    tags = {**{key: str(value) for key, value in details.items()}, "serve_command": served_by,
            **({"source_run_id": source_run_id} if source_run_id else {})}
    try:
        with short_requests(REQUEST_TIMEOUT_S, retries=2):
            client.update_model_version(name, version, description="\n".join(lines).strip())
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
    except MlflowException as err:
        log.warning("could not describe model version %s/%s: %s", name, version, err)

