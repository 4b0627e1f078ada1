"""The garbage collector around graph compilation: what is collected before a run compiles, and what never is."""
from __future__ import annotations

import gc

from conformer.runtime.signals import native_section

_earlier_task = False  # a task ran in this process before


def start_run() -> None:
    """A task is about to build and compile its graphs (its modules imported).

    After an earlier task in this process, collect its garbage first: MindSpore names a compiled graph by an id of
    its argument types, shared by every cell in the process, and a cell's finalizer forgets that id. A cell of the
    earlier run (cells hold reference cycles) that is garbage but not yet collected would lend its id to the new
    compile; the collection MindSpore runs inside the compile then frees it, and the next call, finding no id,
    compiles the same graph once more (5 s for a tiny nano, more for Ti).

    Then freeze what lives now (modules, configs, the store client) out of every later collection: MindSpore
    runs a full `gc.collect()` before each graph it compiles, which otherwise walks the whole heap each time
    (~0.3 s in `python run.py`, seconds in a long-lived process). A later task unfreezes before it collects, so
    that what an earlier freeze kept and has since become garbage is freed too (a sweep's trials would otherwise
    keep ~15 MB each). A process's first task skips the collection, as it has no earlier cells to free.
    """
    global _earlier_task
    with native_section():  # a signal raised inside a finalizer would be swallowed
        if _earlier_task:
            gc.unfreeze()
            gc.collect()
        gc.freeze()
    _earlier_task = True
