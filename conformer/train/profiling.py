"""`trainer.profile_steps` (debug=profile): MindSpore's profiler over a few train steps after the compile.

The op-type summary is written to `<run dir>/profile/op_types.csv` (its top lines are logged) and the profiler's
output folder is logged to MLflow as the artifact `profile/`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import mindspore as ms
from mindspore.profiler import ProfilerActivity, tensorboard_trace_handler

log = logging.getLogger(__name__)
OP_TYPE_TABLE = "cpu_op_type_info_0.csv"
TOTAL_TIME = "total_compute_time"


class StepProfiler:
    """Profiles the `steps` train steps after the first (compiled) one, then reports and logs the result."""

    def __init__(self, steps: int | None, run_dir: Path, tracker: Any,
                 quiet: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.steps_left = int(steps or 0)
        # The profiler parses its data in forked processes: no other thread may hold a lock they need (a live
        # progress bar's console lock), so the analysis runs inside `quiet()`.
        self.quiet = quiet
        self.directory = Path(run_dir) / "profile"
        self.tracker = tracker
        self._profiler: Any = None

    def after_step(self) -> None:
        """Call after every train step: starts after the first one, stops and reports after `steps` more."""
        if self.steps_left <= 0:
            return
        if self._profiler is None:
            self._profiler = ms.profiler.profile(activities=[ProfilerActivity.CPU],
                                                 on_trace_ready=tensorboard_trace_handler(str(self.directory)))
            self._profiler.start()
            return
        self._profiler.step()
        self.steps_left -= 1
        if self.steps_left == 0:
            self._finish()

    def _finish(self) -> None:
        with self.quiet():
            self._profiler.stop()
        self._profiler = None
        tables = sorted(self.directory.rglob(OP_TYPE_TABLE))
        if tables:
            summary = self.directory / "op_types.csv"
            lines = by_total_time(tables[-1].read_text())
            summary.write_text("\n".join(lines) + "\n")
            log.info("profile of the train step, top op types (%s):\n%s", summary, "\n".join(lines[:11]))
        else:
            log.warning("the profiler wrote no op-type table under %s", self.directory)
        self.tracker.log_artifact(self.directory, "profile")


def by_total_time(table: str) -> list[str]:
    """The profiler's op-type table (CSV) as lines, the header first, then the op types by total time, longest first
    (the profiler writes them in no useful order)."""
    header, *rows = table.strip().splitlines()
    column = header.split(",").index(TOTAL_TIME)
    return [header, *sorted(rows, key=lambda row: -float(row.split(",")[column]))]
