"""Structured logging: one line per event, ``key=value`` or JSON, never a secret."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from micboard.shared.redact import SecretRedactionFilter

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


def _kv_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg=... key=value`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` and its ``extra`` fields as one line of key=value pairs."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_kv_value(record.getMessage())}",
        ]
        parts += [f"{k}={_kv_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_kv_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` and its ``extra`` fields as one JSON object."""
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", fmt: Literal["kv", "json"] = "kv") -> None:
    """Send micboard's logs to stderr, one structured line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    # On the handler, not the root logger: records of child loggers bypass logger filters.
    handler.addFilter(SecretRedactionFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class LogThrottle:
    """Says when a recurring message is due to be logged again: once per ``every_s`` for each text.

    For errors a library reports on every retry (nats-py's connection callbacks): the same text
    is logged once per ``every_s``, with how often it recurred meanwhile.
    """

    __slots__ = ("_last", "_repeated", "every_s")

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._repeated: dict[str, int] = {}

    def due(self, text: str) -> int | None:
        """``None`` when ``text`` was logged less than ``every_s`` ago, else how often it recurred since."""
        now = time.monotonic()
        last = self._last.get(text)
        if last is not None and now - last < self.every_s:
            self._repeated[text] = self._repeated.get(text, 0) + 1
            return None
        if len(self._last) > 100:  # distinct texts without end (a subject each): forget the old
            self._last.clear()
            self._repeated.clear()
        self._last[text] = now
        return self._repeated.pop(text, 0)
