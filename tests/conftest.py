"""Shared test setup: CPU tuning and device before MindSpore runs any kernel, graph mode per test, data paths, one
compile cache for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import pytest

import conformer  # noqa: F401  (sets ONEDNN_MAX_CPU_ISA and GLOG_v before MindSpore loads)

# Pin the device before any test runs a kernel: MindSpore refuses `set_device` once its runtime is up, unless the
# device was already set to the same value (which the tests and conformer.hardware then do harmlessly).
ms.set_device("CPU")

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"


@pytest.fixture(autouse=True)
def graph_mode() -> None:
    """Every test starts in graph mode, the product's mode (a test may switch to PyNative for itself)."""
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The `python run.py` trainings of the session share one compile cache (its default is per project root, and
    every test has its own): a tiny config compiled by one test loads in the next, on every xdist worker."""
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own base temp under the session's
        session = session.parent
    os.environ["CONFORMER_COMPILE_CACHE"] = str(session / "compile_cache")
