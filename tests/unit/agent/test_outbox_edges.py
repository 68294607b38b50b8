"""Outbox failure edges on real SQLite files: bad paths, unknown schema, tampering while open, tiny bounds."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from micboard.agent.outbox import OUTBOX_FILE, Outbox, OutboxError, OutboxRecord

T0 = 1_700_000_000_000


def record(
    device: str | None, *, size: int = 10, created_ms: int = T0, snapshot: bool = False
) -> OutboxRecord:
    return OutboxRecord(
        subject="micboard.v1.s.a.device",
        msg_id="a.b.1",
        kind="device",
        payload=b"x" * size,
        created_ms=created_ms,
        device_key=device,
        is_snapshot=snapshot,
    )


def tamper(path: Path, *statements: str) -> None:
    """Change the outbox file behind the open outbox's back, from another connection."""
    other = sqlite3.connect(path)
    try:
        for statement in statements:
            other.execute(statement)
        other.commit()
    finally:
        other.close()


def test_bounds_must_be_positive(tmp_path: Path) -> None:
    for options in ({"max_bytes": 0}, {"max_age_s": 0}, {"fsync_interval_s": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            Outbox(tmp_path / OUTBOX_FILE, **options)  # type: ignore[arg-type]


def test_an_outbox_that_is_not_open_refuses_reads_and_closes_quietly(tmp_path: Path) -> None:
    outbox = Outbox.in_state_dir(tmp_path / "state", max_bytes=1000)
    assert outbox.path == tmp_path / "state" / OUTBOX_FILE and outbox.max_bytes == 1000
    with pytest.raises(OutboxError, match="not open"):
        outbox.oldest()
    outbox.close()  # never opened: nothing to do
    assert not outbox.path.exists()


def test_unusable_paths_are_clear_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutboxError, match="cannot create the state directory"):
        Outbox(blocker / OUTBOX_FILE).open()
    # A directory where the database file should be: not corruption, so nothing is moved aside.
    (tmp_path / "state" / OUTBOX_FILE).mkdir(parents=True)
    outbox = Outbox(tmp_path / "state" / OUTBOX_FILE)
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        outbox.open()
    assert outbox.stats().corrupt_recoveries == 0
    assert (tmp_path / "state" / OUTBOX_FILE).is_dir()


def test_an_unknown_schema_version_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / OUTBOX_FILE
    tamper(path, "CREATE TABLE future (x)", "PRAGMA user_version = 7")
    with caplog.at_level(logging.ERROR, logger="micboard.agent.outbox"):
        outbox = Outbox(path).open()
    try:
        assert outbox.stats().corrupt_recoveries == 1 and outbox.stats().depth == 0
        assert "unknown outbox schema version 7" in caplog.records[0].__dict__["error"]
        [aside] = tmp_path.glob(OUTBOX_FILE + ".corrupt-*")
        assert sqlite3.connect(aside).execute("PRAGMA user_version").fetchone()[0] == 7
        outbox.put(record("rx-1"))
        assert [r.device_key for r in outbox.oldest()] == ["rx-1"]
    finally:
        outbox.close()


def test_a_schema_corrupted_while_open_is_recovered_on_the_next_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / OUTBOX_FILE
    outbox = Outbox(path).open()
    try:
        outbox.put(record("rx-1"))
        # Another writer damages the schema (as a failing card would) and bumps its cookie.
        version = sqlite3.connect(path).execute("PRAGMA schema_version").fetchone()[0]
        tamper(
            path,
            "PRAGMA writable_schema = ON",
            "UPDATE sqlite_master SET sql = 'CREATE TABLE events (garbage' WHERE name = 'events'",
            f"PRAGMA schema_version = {version + 1}",
        )
        with caplog.at_level(logging.ERROR, logger="micboard.agent.outbox"):
            assert outbox.put(record("rx-2")) == []
        # The acked and stored events went with the damaged file; the new one is in a fresh outbox.
        assert outbox.stats().corrupt_recoveries == 1
        assert [(r.id, r.device_key) for r in outbox.oldest()] == [(1, "rx-2")]
        assert outbox.stats().depth == 1 and "CORRUPT" in caplog.text
        copies = [p.name for p in tmp_path.glob(OUTBOX_FILE + ".corrupt-*")]
        assert len([name for name in copies if not name.endswith(("-wal", "-shm"))]) == 1
    finally:
        outbox.close()


def test_a_missing_table_is_an_error_not_corruption(tmp_path: Path) -> None:
    path = tmp_path / OUTBOX_FILE
    outbox = Outbox(path, max_age_s=60).open()
    try:
        outbox.put(record("rx-1", created_ms=T0))
        tamper(path, "DROP TABLE events")
        with pytest.raises(OutboxError, match="outbox write failed: no such table: events"):
            outbox.put(record("rx-2"))
        with pytest.raises(OutboxError, match="outbox read failed"):
            outbox.oldest()
        with pytest.raises(OutboxError, match="outbox expiry failed"):
            outbox.expire(now_ms=T0 + 3_600_000)
        assert outbox.stats().corrupt_recoveries == 0
        assert not list(tmp_path.glob(OUTBOX_FILE + ".corrupt-*"))
        assert not outbox._conn.in_transaction  # rolled back: the next caller starts clean
    finally:
        outbox.close()


def test_one_event_larger_than_the_bound_is_kept_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / OUTBOX_FILE, max_bytes=50).open()
    try:
        with caplog.at_level(logging.ERROR, logger="micboard.agent.outbox"):
            # A device's newest state is never dropped, even when it alone passes the bound.
            assert outbox.put(record("rx-1", size=200, snapshot=True)) == []
            assert outbox.put(record("rx-2", size=200, snapshot=True)) == []
        stats = outbox.stats()
        assert stats.depth == 2 and stats.bytes > stats.max_bytes and stats.dropped_full == 0
        over = [r for r in caplog.records if "still over its bound" in r.getMessage()]
        assert len(over) == 1  # said once, not per write
    finally:
        outbox.close()


def test_a_failed_write_is_rolled_back_and_the_totals_recounted(tmp_path: Path) -> None:
    path = tmp_path / OUTBOX_FILE
    outbox = Outbox(path).open()
    try:
        outbox.put(record("rx-1"))
        before = outbox.stats()
        # Every insert now fails inside the transaction, after the acked row was deleted.
        tamper(path, "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT no_such_function(); END")
        with pytest.raises(OutboxError, match="outbox write failed: no such function"):
            outbox.write([record("rx-2")], [1])
        # Nothing of the transaction stayed: the acked row is still there, the totals agree.
        assert [r.device_key for r in outbox.oldest()] == ["rx-1"]
        assert (outbox.stats().depth, outbox.stats().bytes) == (before.depth, before.bytes)
        assert outbox.stats().corrupt_recoveries == 0 and not outbox._conn.in_transaction
    finally:
        outbox.close()
