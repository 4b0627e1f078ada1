"""Compiled graphs shared by the runs of one process (a sweep's trials, or tests)."""
from __future__ import annotations

import gc

from conformer.signals import native_section

_runs_started = 0


def start_run() -> None:
    """A task is about to build and compile its graphs: after an earlier task in this process, collect its garbage.

    MindSpore names a compiled graph by an id of its argument types, shared by every cell in the process, and a
    cell's finalizer forgets that id. A cell of the earlier run (cells hold reference cycles) that is garbage but
    not yet collected would lend its id to the new compile; the collection MindSpore runs inside the compile then
    frees it, and the next call, finding no id, compiles the same graph once more (5 s for a tiny nano, more for Ti).
    A full collection costs ~0.3 s here, so a process's first task, which has no such garbage, skips it.
    """
    global _runs_started
    if _runs_started:
        with native_section():  # a signal raised inside a finalizer would be swallowed
            gc.collect()
    _runs_started += 1
