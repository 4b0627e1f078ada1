"""A training's checkpoints as artifacts of its MLflow run, stored once.

With a local artifact store (`file:` URIs: the default SQLite store keeps them under `<project root>/mlruns`) the
artifact `checkpoints/<name>` is a hard link of the run dir's file: one copy on disk, which outlives either name (a
cleaned `outputs/` leaves the artifact; a deleted run leaves the run dir). Each save renames a new file over the old
name, so each save links again; a top-k file pushed out is unlinked from both. Where the two are on different file
systems the artifact is a copy (one warning). With a remote store (a tracking server's `mlflow-artifacts:`, S3, ...)
each save is uploaded by the run's outbox thread (`CheckpointUpload`): the step never waits, and an outage only
delays the upload like the metrics.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)
CHECKPOINT_ARTIFACTS = "checkpoints"  # the artifact folder `mlflow:<run_id>` reads


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The directory of a `file:` (or plain path) artifact URI, which MLflow's own client writes to directly; None
    for remote stores."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file") or (parsed.netloc and parsed.netloc != "localhost"):
        return None
    return Path(unquote(parsed.path))


def link_artifact(source: Path, directory: Path) -> Path:
    """`directory/<source name>` made the same file as `source` (atomically: a new link renamed over the old one);
    a copy where hard links fail. Returns the artifact's path."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / source.name
    if target.exists() and os.path.samefile(source, target):
        return target
    tmp = directory / f".{source.name}.{uuid.uuid4().hex}.partial"
    try:
        try:
            os.link(source, tmp)
        except OSError as err:
            log.warning("cannot hard-link %s into the MLflow artifacts %s (%s): copied instead (two copies on disk)",
                        source, directory, err)
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def unlink_artifact(name: str, directory: Path) -> None:
    try:
        (directory / name).unlink()
    except FileNotFoundError:
        pass
