"""Secrets never leave the environment: the user info of a URI (`http://user:password@host`) is redacted from
everything the project writes (logs, tags, params, artifacts, Hydra's run files, console lines).

`redact(text)` replaces the user info of every URI in `text` with `***`; `RedactingFilter` does it to every log
record of a handler; `redact_files` rewrites files (Hydra's `.hydra/*.yaml`) in place. A leaf: no heavy imports.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

MASK = "***"
# scheme://user[:password]@  (the user info ends at the last "@" before the path: a raw "@" in a password too)
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/\s'\"]+)@")


def redact(text: str) -> str:
    """`text` with the user info of every URI in it replaced by `***` (`http://***@host:5000`)."""
    if "@" not in text:
        return text
    return _USER_INFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def without_user_info(uri: str) -> str:
    """`uri` with its user info left out (not masked): a URI a printed command can use as it is, the credentials
    coming from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead."""
    return _USER_INFO.sub(lambda m: m.group("scheme"), uri)


def has_secret(text: str) -> bool:
    return redact(text) != text


class RedactingFilter(logging.Filter):
    """Redacts URIs' user info in a record's message before any handler formats it (one instance per handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record: the handler reports it as usual)
            return True
        if has_secret(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None and has_secret(str(record.exc_info[1])):
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger) that has none."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_files(paths: Iterable[Path]) -> None:
    """Rewrite each existing file whose text holds a URI's user info, with it redacted."""
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if has_secret(text):
            path.write_text(redact(text))
