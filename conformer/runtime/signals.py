"""Ctrl-C, SIGTERM and SIGHUP (a closed terminal): the project's one handler for all three, raising `Interrupted` in
the main thread.

Inside `interruptible()` each signal raises `Interrupted` (a KeyboardInterrupt that knows its signal), so every
layer unwinds as for Ctrl-C: the MLflow run ends KILLED, msrun workers are stopped, the exit code is 128 + signal.
MindSpore sets its own SIGINT handler (C level) on every graph run, and it answers a Ctrl-C with a SIGTERM (a Ctrl-C
in training exited 143): `reclaim_handlers` (called from `check_interrupted`, every training step) stops it from
doing so and installs ours again. The first signal decides: one that follows while the process stops changes neither the
exit code nor the message, and is not raised again inside the clean-up.
The signal is also remembered: Python drops an exception raised inside a finalizer or weakref callback
("Exception ignored in ..."), so the training loop calls `check_interrupted()` to raise it again.

Python runs signal handlers only between bytecodes of the main thread, so a signal that arrives while MindSpore
compiles a graph (minutes, mostly C++) would wait for the compile to end, and an exception raised from a handler
inside MindSpore's own Python callbacks gets swallowed by it. Code that calls into such a phase marks it with
`native_section()`: there the handler only records the signal. A watchdog thread learns of every signal at once
(`signal.set_wakeup_fd`); when the main thread has not taken it within `FORCED_EXIT_AFTER_S` (still in a native
section, or its handler never ran), the watchdog runs the callbacks registered with `on_forced_exit` (the open
MLflow run ends KILLED), prints one line and exits the process with 128 + signal. Once the main thread took the
signal, a backstop does the same if the process is still alive `CLEANUP_BACKSTOP_S` later (a clean-up that hangs,
such as data workers that never join, must not keep a stopped training alive).
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
from pathlib import Path
from typing import Any

from conformer.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCED_EXIT_AFTER_S = 3.0
CLEANUP_BACKSTOP_S = 60.0  # beyond the 30 s a run's MLflow backlog may take to drain
_forced_exit_callbacks: list[Callable[[], None]] = []


class _Pending:
    signum: int | None = None
    native = False  # inside native_section()
    backstop: threading.Timer | None = None


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _Pending.signum is not None:  # the first signal is the user's; a later one repeats it while the process
        return                       # stops, and raising again would only break a clean-up (MindSpore's finalizers)
    _Pending.signum = signum
    _arm_backstop(signum)
    if not _Pending.native and not _in_finalizer(frame):
        raise Interrupted(signum)


def _arm_backstop(signum: int) -> None:
    """End the process `CLEANUP_BACKSTOP_S` after the first signal unless `interruptible()` is left first (see the
    module's doc); `exit_within` covers what follows, up to the process's exit."""
    def backstop() -> None:
        _force_exit(signum, f"the clean-up did not end within {CLEANUP_BACKSTOP_S:g} s")

    _Pending.backstop = threading.Timer(CLEANUP_BACKSTOP_S, backstop)
    _Pending.backstop.daemon = True
    _Pending.backstop.start()


def exit_within(exit_code: int, seconds: float = CLEANUP_BACKSTOP_S) -> None:
    """The process is about to exit with `exit_code` after a signal: should its exit hang (a library's threads or
    processes that never join), end it `seconds` from now."""
    def backstop() -> None:
        print(f"the exit did not end within {seconds:g} s: stopping now", file=sys.stderr, flush=True)
        os._exit(exit_code)

    timer = threading.Timer(seconds, backstop)
    timer.daemon = True
    timer.start()


def _in_finalizer(frame: Any) -> bool:
    """The signal interrupted a `__del__` (MindSpore's dataset pools wait in theirs): an exception raised there is
    printed and dropped by Python, so the signal is only recorded and `check_interrupted` raises it."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _ours(signum: int) -> bool:
    return signal.getsignal(signum) is _raise_interrupted


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` while inside; the previous handlers come back on exit.

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
    previous_hook = sys.unraisablehook
    if installed:
        sys.unraisablehook = _quiet_interrupts(previous_hook)
    try:
        yield
    finally:
        if installed:
            sys.unraisablehook = previous_hook
        if watchdog is not None:
            watchdog.stop()
        for signum, previous in installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if installed:
            _Pending.signum = None
            if _Pending.backstop is not None:
                _Pending.backstop.cancel()
                _Pending.backstop = None


def _quiet_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that keeps quiet about `Interrupted` raised inside a finalizer (Python would print
    its traceback): the signal is remembered and `check_interrupted` raises it again."""
    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            previous(unraisable)
    hook.quiet_interrupts = True  # type: ignore[attr-defined]
    return hook


# MindSpore 2.10's GraphScheduler::Run calls RegisterGlobalSignalHandler(DefaultIntHandler) on every graph run: a
# sigaction for SIGINT (unseen by Python) whose handler is `kill(getpid(), SIGTERM)`. A Ctrl-C during training thus
# arrived as SIGTERM (exit 143, "received SIGTERM"). The registration is made a no-op returning true (`mov $1, %eax;
# ret`) in this process, after checking that the function starts as expected; our Python handler then keeps SIGINT.
_REGISTER_SIGINT = "_ZN9mindspore27RegisterGlobalSignalHandlerEPFviP9siginfo_tPvE"
_REGISTER_PROLOGUE = b"\x41\x57\x41\x56"  # push %r15; push %r14
_RETURN_TRUE = b"\xb8\x01\x00\x00\x00\xc3"


class _MindSporeSigint:
    disarmed = False


def _disarm_mindspore_sigint() -> None:
    """Stop MindSpore from taking SIGINT from us on each graph run (see above); silently nothing where the library or
    the function is not the one we know."""
    if _MindSporeSigint.disarmed or "mindspore" not in sys.modules:
        return
    _MindSporeSigint.disarmed = True
    import ctypes
    import mmap

    try:
        maps = Path("/proc/self/maps").read_text().split()
        library = next(path for path in maps if path.endswith("/libmindspore_common.so"))
        address = ctypes.cast(getattr(ctypes.CDLL(library), _REGISTER_SIGINT), ctypes.c_void_p).value
    except (OSError, StopIteration, AttributeError):
        return
    if ctypes.string_at(address, len(_REGISTER_PROLOGUE)) != _REGISTER_PROLOGUE:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = address - address % mmap.PAGESIZE
    size = address + len(_RETURN_TRUE) - page
    if libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) != 0:
        return
    ctypes.memmove(address, _RETURN_TRUE, len(_RETURN_TRUE))
    libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_EXEC)


def reclaim_handlers() -> None:
    """Install our handlers again at the C level (MindSpore may have set its own SIGINT handler since, see
    `_disarm_mindspore_sigint`), and the hook that keeps quiet about an `Interrupted` Python drops (MindSpore's first
    epoch sets `sys.unraisablehook` back to Python's, from C: a Ctrl-C landing in an at-fork callback of the next
    epoch's data workers printed a traceback). Main thread, inside `interruptible()` only."""
    if threading.current_thread() is not threading.main_thread():
        return
    _disarm_mindspore_sigint()
    for signum in HANDLED:
        if _ours(signum):
            signal.signal(signum, _raise_interrupted)
    if any(_ours(signum) for signum in HANDLED) and not getattr(sys.unraisablehook, "quiet_interrupts", False):
        sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)


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
                _force_exit(_Pending.signum or data[0])

    def stop(self) -> None:
        self._stopping = True
        signal.set_wakeup_fd(self._previous_fd)
        self._write.send(b"\0")
        self.join(timeout=1.0)
        self._read.close()
        self._write.close()


def _force_exit(signum: int, why: str = "while MindSpore was busy (compiling?)") -> None:
    print(f"interrupted (received {signal.Signals(signum).name}) {why}: stopping now", file=sys.stderr, flush=True)
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
    """Raise `Interrupted` when a signal arrived but its exception got swallowed on the way; our handlers are made
    sure of again (`reclaim_handlers`), as a data pipeline may have replaced one since the last call."""
    reclaim_handlers()
    if _Pending.signum is not None:
        raise Interrupted(_Pending.signum)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP are ignored while inside: for a cleanup that must not be cut short (main thread
    only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
