"""Ctrl-C and SIGTERM: the project's one handler for both, raising `Interrupted` in the main thread.

Inside `interruptible()` either signal raises `Interrupted` (a KeyboardInterrupt that knows its signal), so every
layer unwinds as for Ctrl-C: the MLflow run ends KILLED, msrun workers are stopped, the exit code is 128 + signal.
The signal is also remembered: Python drops an exception raised inside a finalizer or weakref callback
("Exception ignored in ..."), so the training loop calls `check_interrupted()` to raise it again.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is the shell convention 128 + signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Pending:
    signum: int | None = None


def _raise_interrupted(signum: int, frame: Any) -> None:
    _Pending.signum = signum
    raise Interrupted(signum)


def _ours(signum: int) -> bool:
    return signal.getsignal(signum) is _raise_interrupted


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while inside; the previous handlers come back on exit.

    Does nothing outside the main thread (handlers can only be set there) and leaves an ignored SIGINT alone
    (a background job started with `&`). Nested uses share the outer handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for signum in HANDLED:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or _ours(signum):
            continue
        installed[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if installed:
            _Pending.signum = None


def check_interrupted() -> None:
    """Raise `Interrupted` when a signal arrived but its exception got swallowed on the way."""
    if _Pending.signum is not None:
        raise Interrupted(_Pending.signum)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored while inside: for a cleanup that must not be cut short (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
