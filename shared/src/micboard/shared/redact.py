"""Redaction of secrets from log records: a last line of defence behind "never log a secret".

Code should not pass secrets to the logger at all; this filter catches the ones that slip
through anyway (an exception message quoting a database URL, a library echoing a token). It
recognises secrets by shape (NKey seeds, JWTs, bearer tokens, passwords in URLs), by the name of
the field that holds them (``password=``, ``token=``...), and by value for secrets registered with
:func:`register_secret` when they are loaded.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

REDACTED = "***"

_SECRET_NAME = re.compile(
    r"(password|passwd|secret|token|seed|api_?key|private_?key|authorization|credential|cookie)", re.I
)
# Fields that name where a secret lives, not the secret: worth keeping for diagnosis.
_PATH_KEYS = ("_file", "_path", "_dir")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # NKey seeds: 58 base32 characters starting with S and the key type (SU.., SA.., SO..).
    (re.compile(r"\bS[A-Z][A-Z2-7]{56}\b"), REDACTED),
    # micboard API tokens (mbt_ and 43 URL-safe characters), wherever they appear bare.
    (re.compile(r"\bmbt_[A-Za-z0-9_-]{20,}"), REDACTED),
    # JSON Web Tokens (NATS user JWTs included).
    (re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"), REDACTED),
    # Authorization headers.
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # The password part of a URL's user info: scheme://user:password@host.
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.I), rf"\1{REDACTED}@"),
    # key=value and key: value pairs whose key names a secret.
    (
        re.compile(
            r"(?i)\b([\w.-]*(?:password|passwd|secret|token|seed|api_?key|private_?key)[\w.-]*"
            r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',;&}]+"
        ),
        rf"\1{REDACTED}",
    ),
)

_MIN_REGISTERED_LEN = 8
_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Redact ``value`` wherever it appears in a log line from now on (ignored under 8 characters)."""
    value = value.strip()
    if len(value) >= _MIN_REGISTERED_LEN:
        with _registered_lock:
            _registered.add(value)


def redact_text(text: str) -> str:
    """``text`` with every secret it appears to contain replaced by ``***``."""
    with _registered_lock:
        known = sorted(_registered, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if (
        isinstance(value, (str, bytes))
        and value
        and _SECRET_NAME.search(key)
        and not key.endswith(_PATH_KEYS)
    ):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    # Anything else is rendered with str() by the formatters; redact that rendering.
    return redact_text(str(value))


class SecretRedactionFilter(logging.Filter):
    """Rewrites a record so that its message, ``extra`` fields and exception text carry no secret.

    Install it on the handler (filters on a logger do not see records of child loggers). An
    exception is rendered here, redacted, and moved to the ``exc`` field, which is the field
    micboard's formatters write tracebacks to.
    """

    def __init__(self, reserved: frozenset[str] | None = None) -> None:
        super().__init__()
        self._reserved = reserved or frozenset(vars(logging.makeLogRecord({})).keys()) | {
            "message",
            "asctime",
        }

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; never drops it."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        for key in [k for k in vars(record) if k not in self._reserved]:
            setattr(record, key, _redact_value(key, getattr(record, key)))
        if record.exc_info:
            rendered = logging.Formatter().formatException(record.exc_info)
            record.exc = redact_text(rendered)
            record.exc_info = None
            record.exc_text = None
        return True
