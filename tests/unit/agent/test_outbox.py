"""The outbox: bounds, the drop policy (never the newest state of a device), age, restarts, corruption."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from micboard.agent.outbox import OUTBOX_FILE, Outbox, OutboxError, OutboxRecord

T0 = 1_700_000_000_000


def record(
    device: str | None, *, snapshot: bool = False, size: int = 100, created_ms: int = T0
) -> OutboxRecord:
    """A record whose ``size`` is exactly ``size`` bytes (payload padded)."""
    subject = "micboard.v1.s.a." + ("device" if device else "heartbeat")
    mid = "a.b.1"
    payload = b"x" * max(0, size - len(subject) - len(mid) - len(device or ""))
    return OutboxRecord(
        subject=subject,
        msg_id=mid,
        kind="device" if device else "heartbeat",
        payload=payload,
        created_ms=created_ms,
        device_key=device,
        is_snapshot=snapshot,
    )


@pytest.fixture
def clock() -> list[int]:
    return [T0]


def open_outbox(path: Path, clock: list[int], **options: float) -> Outbox:
    return Outbox(path / OUTBOX_FILE, clock_ms=lambda: clock[0], **options).open()  # type: ignore[arg-type]


def ids(outbox: Outbox) -> list[int]:
    return [r.id for r in outbox.oldest(10_000)]


def test_stores_and_drains_oldest_first(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock)
    first = record("rx-1", snapshot=True)
    outbox.put(first)
    outbox.write([record("rx-2"), record(None)], [])
    assert [r.device_key for r in outbox.oldest(10)] == ["rx-1", "rx-2", None]
    assert outbox.oldest(1)[0].payload == first.payload and outbox.oldest(1)[0].is_snapshot
    outbox.delete([first.id])
    assert [r.device_key for r in outbox.oldest(10)] == ["rx-2", None]
    assert [r.kind for r in outbox.read_lane("", 0)] == ["heartbeat"]
    stats = outbox.stats()
    assert (stats.depth, stats.bytes, stats.dropped) == (2, 200, 0)
    outbox.close()


def test_full_drops_a_superseded_snapshot_with_its_deltas(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, max_bytes=1000)
    old_snap = record("rx-1", snapshot=True)
    delta = record("rx-1")
    outbox.write([old_snap, delta, record("rx-1", snapshot=True), record(None)], [])
    # Over the bound: the superseded snapshot goes first, and the delta that builds on it with it.
    dropped = outbox.write([record("rx-2", snapshot=True, size=700)], [])
    assert dropped == [old_snap.id, delta.id]
    assert outbox.stats().dropped_full == 2 and outbox.stats().bytes <= 1000
    # Next: the oldest superseded event left, the agent's.
    dropped = outbox.write([record("rx-2", size=150)], [])
    assert dropped == [delta.id + 2]
    assert outbox.stats().dropped_full == 3


def test_never_drops_the_newest_snapshot_of_a_device(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, max_bytes=1000)
    newest = {}
    for n in range(30):
        device = f"rx-{n % 5}"
        rec = record(device, snapshot=n % 3 == 0, size=150)
        outbox.put(rec)
        if rec.is_snapshot:
            newest[device] = rec.id
    kept = set(ids(outbox))
    assert set(newest.values()) <= kept
    # The devices' newest state does not fit: their newest deltas went (newest first), each
    # device keeps its newest snapshot, and the outbox is within its bound.
    assert outbox.stats().bytes <= 1000 and outbox.stats().dropped_newest > 0
    big = record("rx-9", snapshot=True, size=900)
    outbox.put(big)
    # Snapshots alone over the bound: kept anyway (logged), at most one per device.
    assert set(ids(outbox)) == set(newest.values()) | {big.id}
    assert outbox.stats().bytes == 5 * 150 + 900


def test_age_expiry_keeps_the_newest_state(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, max_age_s=60)
    old = [record("rx-1", created_ms=T0), record("rx-1", created_ms=T0 + 1), record(None, created_ms=T0)]
    outbox.write(old, [])
    fresh = record("rx-2", created_ms=T0 + 50_000)
    outbox.put(fresh)
    clock[0] = T0 + 30_000
    assert outbox.expire() == []
    clock[0] = T0 + 61_000
    expired = outbox.expire()
    # rx-1 has no snapshot stored: both deltas are its newest state (they build on what the
    # collector has) and stay, though old; the heartbeat goes.
    assert expired == [old[2].id]
    assert ids(outbox) == [old[0].id, old[1].id, fresh.id]
    stats = outbox.stats()
    assert stats.dropped_age == 1 and stats.dropped_full == 0
    assert stats.oldest_age_s == pytest.approx(61.0)


def test_reopen_after_restart_keeps_everything(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock)
    outbox.write([record("rx-1", snapshot=True), record("rx-1"), record(None)], [])
    before = outbox.oldest(10)
    outbox.close()
    again = open_outbox(tmp_path, clock)
    assert again.oldest(10) == before
    assert (again.stats().depth, again.stats().bytes) == (3, 300)
    assert again.lanes() == {"rx-1": before[1].id, "": before[2].id}
    assert again.max_id() == before[2].id
    again.close()


def test_committed_events_survive_sigkill(tmp_path: Path) -> None:
    """A process killed right after a commit loses nothing: the WAL is in the OS cache."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from micboard.agent.outbox import Outbox, OutboxRecord
        outbox = Outbox(Path({str(tmp_path / OUTBOX_FILE)!r}), fsync_interval_s=60).open()
        for n in range(500):
            outbox.put(OutboxRecord(subject="s", msg_id=f"a.b.{{n}}", kind="device", payload=b"p",
                                    created_ms=1, device_key="rx"))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == -signal.SIGKILL
    outbox = Outbox(tmp_path / OUTBOX_FILE).open()
    assert outbox.stats().depth == 500
    assert outbox.oldest(1)[0].msg_id == "a.b.0"


def test_corrupt_file_is_moved_aside_and_counted(
    tmp_path: Path, clock: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / OUTBOX_FILE).write_bytes(b"this is not a database" * 500)
    outbox = open_outbox(tmp_path, clock)
    assert outbox.stats().corrupt_recoveries == 1
    assert "CORRUPT" in caplog.text
    aside = list(tmp_path.glob(OUTBOX_FILE + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    outbox.put(record("rx-1"))
    assert outbox.stats().depth == 1


def test_corruption_found_while_running_is_recovered(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock)
    for _ in range(200):
        outbox.put(record("rx-1", size=2000))
    outbox.close()
    path = tmp_path / OUTBOX_FILE
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 6] = os.urandom(4096 * 4)  # wreck b-tree pages past the header
    path.write_bytes(bytes(data))
    outbox = open_outbox(tmp_path, clock)
    assert outbox.stats().corrupt_recoveries == 1
    assert outbox.stats().depth == 0
    outbox.put(record("rx-1"))
    assert outbox.stats().depth == 1


def test_only_three_corrupt_copies_are_kept(tmp_path: Path, clock: list[int]) -> None:
    for n in range(5):
        (tmp_path / OUTBOX_FILE).write_bytes(b"garbage" * 1000)
        clock[0] += 1
        open_outbox(tmp_path, clock).close()
        assert len(list(tmp_path.glob(OUTBOX_FILE + ".corrupt-*"))) == min(n + 1, 3)


def test_fsync_interval_zero_means_full_sync(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, fsync_interval_s=0)
    assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert outbox._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    outbox.put(record("rx"))
    assert outbox.maybe_sync() is True and outbox.maybe_sync() is False


def test_empty_outbox_gives_space_back(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock)
    batch = [record("rx", size=4000) for _ in range(500)]
    outbox.write(batch, [])
    outbox.sync()
    big = (tmp_path / OUTBOX_FILE).stat().st_size
    outbox.delete([r.id for r in batch])
    outbox.sync()
    outbox.sync()
    assert (tmp_path / OUTBOX_FILE).stat().st_size < big / 4


# The drop policy as a state machine: tests/unit/agent/test_outbox_replayable.py.


def test_sqlite_is_recent_enough() -> None:
    assert sqlite3.sqlite_version_info >= (3, 22)


def test_a_refused_record_is_an_error_not_corruption(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock)
    kept = record("rx-1")
    outbox.put(kept)
    again = dataclasses.replace(record("rx-2"), id=kept.id)  # an id stored already
    with pytest.raises(OutboxError, match="refused"):
        outbox.write([again], [])
    # The file was not moved aside: what it held is still there, and it keeps working.
    assert ids(outbox) == [kept.id]
    assert outbox.stats().corrupt_recoveries == 0
    outbox.put(record("rx-3"))
    assert len(ids(outbox)) == 2
    outbox.close()
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []
