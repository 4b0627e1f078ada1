"""A live progress bar (rich) for the train and eval loops when the console is a terminal.

While a bar is live, the per-step log lines marked `extra={"progress": True}` stay out of the terminal (the bar shows
the same numbers) but still reach train.log; when output goes to a file or a pipe there is no bar and every line is
logged as usual.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _keep_off_terminal(record: logging.LogRecord) -> bool:
    return not getattr(record, "progress", False)


def _terminal_handlers() -> list[logging.Handler]:
    handlers = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if not isinstance(handler, logging.FileHandler) and stream is not None and stream.isatty():
            handlers.append(handler)
    return handlers


def bar_wanted(setting: str | bool, is_main: bool) -> bool:
    """`trainer.progress_bar`: True, False, or "auto" (on rank 0 when stdout is a terminal)."""
    if setting == "auto":
        return is_main and sys.stdout.isatty()
    return bool(setting) and is_main


class ProgressBar:
    """One bar at a time: `start(description, total)`, `advance(**fields)`, `stop()`; does nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None
        self._handlers: list[logging.Handler] = []

    def start(self, description: str, total: int) -> None:
        if not self.enabled:
            return
        self.stop()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=Console(file=sys.stdout), transient=False)
        self._task = self._progress.add_task(description, total=total, status="")
        self._handlers = _terminal_handlers()
        for handler in self._handlers:
            handler.addFilter(_keep_off_terminal)
        self._progress.start()

    def advance(self, steps: int = 1, **fields: str) -> None:
        if self._progress is not None:
            status = "  ".join(f"{key} {value}" for key, value in fields.items())
            self._progress.update(self._task, advance=steps, **({"status": status} if fields else {}))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The live display (and its refresh thread, its stdout redirection) off for a while, the bar kept."""
        progress = self._progress
        if progress is None:
            yield
            return
        progress.stop()
        try:
            yield
        finally:
            progress.start()

    def stop(self) -> None:
        if self._progress is None:
            return
        self._progress.stop()
        for handler in self._handlers:
            handler.removeFilter(_keep_off_terminal)
        self._progress, self._handlers = None, []
