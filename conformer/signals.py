"""Ctrl-C and SIGTERM: the project's one handler for both, raising `Interrupted` in the main thread.

Inside `interruptible()` either signal raises `Interrupted` (a KeyboardInterrupt that knows its signal), so every
layer unwinds as for Ctrl-C: the MLflow run ends KILLED, msrun workers are stopped, the exit code is 128 + signal.
The signal is also remembered: Python drops an exception raised inside a finalizer or weakref callback
("Exception ignored in ..."), so the training loop calls `check_interrupted()` to raise it again.

Python runs signal handlers only between bytecodes of the main thread, so a signal that arrives while MindSpore
compiles a graph (minutes, mostly C++) would wait for the compile to end, and an exception raised from a handler
inside MindSpore's own Python callbacks gets swallowed by it. Code that calls into such a phase marks it with
`native_section()`: there the handler only records the signal. A watchdog thread learns of every signal at once
(`signal.set_wakeup_fd`); when the main thread has not taken it within `FORCED_EXIT_AFTER_S` (still in a native
section, or its handler never ran), the watchdog runs the callbacks registered with `on_forced_exit` (the open
MLflow run ends KILLED), prints one line and exits the process with 128 + signal.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)
FORCED_EXIT_AFTER_S = 3.0
_forced_exit_callbacks: list[Callable[[], None]] = []


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
    native = False  # inside native_section()


def _raise_interrupted(signum: int, frame: Any) -> None:
    _Pending.signum = signum
    if not _Pending.native:
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
    watchdog = _Watchdog() if installed else None
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.stop()
        for signum, previous in installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if installed:
            _Pending.signum = None


def on_forced_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` if the watchdog has to end the process; returns the function that unregisters it."""
    _forced_exit_callbacks.append(callback)
    return lambda: _forced_exit_callbacks.remove(callback) if callback in _forced_exit_callbacks else None


class _Watchdog(threading.Thread):
    """Sees each signal at once through the wakeup fd; ends the process if the main thread cannot take it."""

    def __init__(self) -> None:
        super().__init__(name="signal-watchdog", daemon=True)
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._stopping = False
        self.start()

    def run(self) -> None:
        while True:
            data = self._read.recv(1)
            if self._stopping or not data:
                return
            deadline = time.monotonic() + FORCED_EXIT_AFTER_S
            while (_Pending.signum is None or _Pending.native) and time.monotonic() < deadline:
                time.sleep(0.05)
            if (_Pending.signum is None or _Pending.native) and not self._stopping:  # stuck in MindSpore
                _force_exit(data[0])

    def stop(self) -> None:
        self._stopping = True
        signal.set_wakeup_fd(self._previous_fd)
        self._write.send(b"\0")
        self.join(timeout=1.0)
        self._read.close()
        self._write.close()


def _force_exit(signum: int) -> None:
    print(f"interrupted ({signal.Signals(signum).name}) while MindSpore was busy (compiling?): stopping now",
          file=sys.stderr, flush=True)
    for callback in reversed(_forced_exit_callbacks):
        try:
            callback()
        except Exception as err:  # the exit must happen; a failed cleanup is only reported
            print(f"cleanup failed: {err}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


@contextmanager
def native_section() -> Iterator[None]:
    """A call into MindSpore's compiler or runtime: a signal is recorded, raised when the section ends, and the
    watchdog ends the process if the section lasts past `FORCED_EXIT_AFTER_S` after it."""
    _Pending.native = True
    try:
        yield
    finally:
        _Pending.native = False
    check_interrupted()


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
