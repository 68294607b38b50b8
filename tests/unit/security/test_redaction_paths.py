"""Redaction of records whose message cannot be formatted, and of extras that are not plain strings."""

from __future__ import annotations

import logging
from pathlib import Path

from micboard.shared.redact import REDACTED, SecretRedactionFilter

URL = "postgresql://mb:hunter2-secret@db.example/micboard"


def test_a_message_whose_arguments_do_not_fit_is_redacted_not_raised() -> None:
    # "%d" with a string argument makes getMessage() raise TypeError: the raw message is used.
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, f"cannot reach {URL} (%d)", ("x",), None)
    assert SecretRedactionFilter().filter(record) is True
    assert record.msg == f"cannot reach postgresql://mb:{REDACTED}@db.example/micboard (%d)"
    assert record.args is None
    assert record.getMessage() == record.msg


def test_extras_of_any_type_are_rendered_and_redacted() -> None:
    extras: dict[str, object] = {
        "targets": [URL, "nats://host:4222"],
        "api_key": b"raw-key-bytes",
        "seed_file": "/etc/micboard/agent.nk",
        "where": Path("/srv/micboard"),
        "ratio": 0.5,
        "enabled": True,
        "nothing": None,
        "password": "",  # empty: nothing to hide
    }
    record = logging.makeLogRecord({"msg": "loaded", **extras})
    assert SecretRedactionFilter(reserved=frozenset(vars(logging.makeLogRecord({})))).filter(record)
    got = {key: getattr(record, key) for key in extras}
    assert "hunter2-secret" not in got["targets"] and f"mb:{REDACTED}@db.example" in got["targets"]
    assert "nats://host:4222" in got["targets"]
    assert got["api_key"] == REDACTED
    assert got["seed_file"] == "/etc/micboard/agent.nk"
    assert got["where"] == "/srv/micboard"
    assert (got["ratio"], got["enabled"], got["nothing"], got["password"]) == (0.5, True, None, "")
