"""Shared test setup: CPU tuning and device before MindSpore runs any kernel, graph mode per test, data paths, one
compile cache for the whole session.

tests/README.md names, for each numeric component (EMA, mixup, losses, loss scale, clipping, schedules, optimizers,
the kernels, the model's parity), the test that fails when its math breaks; keep it true when you add one."""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import mindspore as ms
import pytest

import conformer  # noqa: F401  (sets ONEDNN_MAX_CPU_ISA and GLOG_v before MindSpore loads)

# Pin the device before any test runs a kernel: MindSpore refuses `set_device` once its runtime is up, unless the
# device was already set to the same value (which the tests and conformer.runtime.hardware then do harmlessly).
ms.set_device("CPU")

# MindSpore runs a full gc.collect() before every graph it compiles. In a test worker, whose heap holds every module
# and test imported, each one walked millions of objects (over 100 s of the suite's CPU time). Frozen objects are left
# out of collections: the modules imported by now, and the test modules once collected (`pytest_collection_finish`).
gc.freeze()

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"


KERNEL_PATHS = ("project", "mindspore")  # the project's CPU kernels; MindSpore's own ops (what Ascend and GPU run)


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once per kernel path: cells built inside it use that path (`conformer.kernels.select`)."""
    from conformer import kernels

    with kernels.using(request.param) as path:
        yield path


@pytest.fixture(autouse=True)
def default_kernel_path() -> Iterator[None]:
    """A run in the test process (`hardware.kernels=...`) selects a kernel path for the whole process: the next test
    starts on the default again."""
    from conformer import kernels

    yield
    kernels.select("auto")


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


# The test files that take longest on 2 cores (20-130 s each: real trainings, msrun workers, sweeps, servers),
# longest first. xdist hands a worker one whole file at a time (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`): the long files start first and the short ones fill the end, instead of a long file
# starting last and running alone while the other workers idle. Files not listed follow in their usual order.
LONGEST_FIRST = ("test_sweep_parallel.py", "test_run.py", "test_faults.py", "test_tasks.py", "test_distributed.py",
                 "test_sweep.py", "test_host_reads.py", "test_model_config.py",
                 "test_preflight.py", "test_mlflow_checkpoints.py", "test_kernels.py", "test_resume.py",
                 "test_tracking.py", "test_debug.py", "test_compile_cache.py", "test_convert.py", "test_amp.py",
                 "test_step.py", "test_serving.py", "test_tracking_outage.py", "test_config.py", "test_model.py",
                 "test_train_parity.py")


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
