"""The call that compiles a jit graph."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from conformer.signals import native_section


@contextmanager
def compiling() -> Iterator[None]:
    """Around the first call of a graph, which compiles it (a native section: see `conformer.signals`).

    MindSpore names a compiled graph by an id of its argument types, shared by every cell in the process, and a
    cell's finalizer forgets that id. A cell of an earlier run in this process (a sweep's previous trial) that is
    garbage but not yet collected would lend its id to this compile; the collection MindSpore runs inside the
    compile then frees it, and the next call, finding no id, compiles the same graph once more (5 s for a tiny
    nano, more for Ti). Collecting before the compile lets it start from a fresh id.
    """
    gc.collect()
    with native_section():
        yield
