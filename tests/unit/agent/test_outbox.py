"""The outbox: bounds, the drop policy (never the newest state of a device), age, restarts, corruption."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

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


def test_full_drops_superseded_snapshots_before_deltas(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, max_bytes=1000)
    old_snap = record("rx-1", snapshot=True)
    delta = record("rx-1")
    outbox.write([old_snap, delta, record("rx-1", snapshot=True), record(None)], [])
    # Over the bound: the superseded snapshot goes first though the delta is as old.
    dropped = outbox.write([record("rx-2", snapshot=True, size=700)], [])
    assert dropped == [old_snap.id]
    assert outbox.stats().dropped_full == 1 and outbox.stats().bytes <= 1000
    # Next: superseded deltas and agent events, oldest first.
    dropped = outbox.write([record("rx-2", size=150)], [])
    assert dropped == [delta.id, delta.id + 2]
    assert outbox.stats().dropped_full == 3


def test_never_drops_the_newest_state_of_a_device(tmp_path: Path, clock: list[int]) -> None:
    outbox = open_outbox(tmp_path, clock, max_bytes=1000)
    newest = {}
    for n in range(30):
        device = f"rx-{n % 5}"
        rec = record(device, snapshot=n % 3 == 0, size=150)
        outbox.put(rec)
        newest[device] = rec.id
    kept = set(ids(outbox))
    assert set(newest.values()) <= kept
    # Five devices x 150 bytes do not fit in 1000 twice: only their newest events remain, which
    # may pass the bound by at most one event per device.
    assert outbox.stats().bytes <= 1000
    big = record("rx-9", snapshot=True, size=900)
    outbox.put(big)
    remaining = set(ids(outbox))
    assert remaining == set(newest.values()) | {big.id}
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
    # rx-1's newest (though old) stays: it is the device's latest known state.
    assert expired == [old[0].id, old[2].id]
    assert ids(outbox) == [old[1].id, fresh.id]
    stats = outbox.stats()
    assert stats.dropped_age == 2 and stats.dropped_full == 0
    assert stats.oldest_age_s == pytest.approx(60.999)


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


# -- the drop policy, as a state machine -----------------------------------------------------

DEVICES = ("rx-1", "rx-2", "rx-3")
MAX_BYTES = 2_000
MAX_AGE_MS = 100_000


def _tier(row: tuple[int, str | None, bool], rows: list[tuple[int, str | None, bool]]) -> int:
    """Drop step of ``row`` among ``rows`` (1 first), 9 for a device's newest event (never)."""
    row_id, device, snapshot = row
    if device is None:
        return 2
    later = [r for r in rows if r[1] == device and r[0] > row_id]
    superseded = any(r[2] for r in later)
    if superseded:
        return 1 if snapshot else 2
    return 3 if later else 9


class OutboxMachine(RuleBasedStateMachine):
    """Random puts, drains and clock jumps; the outbox must follow its policy exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.now = T0
        self.outbox = Outbox(
            Path(self.dir.name) / OUTBOX_FILE,
            max_bytes=MAX_BYTES,
            max_age_s=MAX_AGE_MS / 1000,
            fsync_interval_s=0.5,
            clock_ms=lambda: self.now,
        ).open()
        # id -> (device, is_snapshot, size, created_ms)
        self.rows: dict[int, tuple[str | None, bool, int, int]] = {}
        self.newest: dict[str, int] = {}
        self.puts = 0
        self.drained = 0

    def teardown(self) -> None:
        self.outbox.close()
        self.dir.cleanup()

    def _model(self) -> list[tuple[int, str | None, bool]]:
        return [(i, d, s) for i, (d, s, _z, _c) in sorted(self.rows.items())]

    @rule(
        device=st.sampled_from((*DEVICES, None)),
        snapshot=st.booleans(),
        size=st.integers(50, 700),
    )
    def put(self, device: str | None, snapshot: bool, size: int) -> None:
        rec = record(device, snapshot=snapshot and device is not None, size=size, created_ms=self.now)
        dropped = self.outbox.put(rec)
        self.puts += 1
        self.rows[rec.id] = (device, rec.is_snapshot, size, self.now)
        if device is not None:
            self.newest[device] = rec.id
        model = self._model()
        tiers = {r[0]: _tier(r, model) for r in model}
        assert all(tiers[i] < 9 for i in dropped), "dropped a device's newest state"
        for i in dropped:
            # Every row of an earlier step, and every older row of the same step, went first.
            assert all(j in dropped for j, t in tiers.items() if t < tiers[i] or (t == tiers[i] and j < i))
        last_size = self.rows[dropped[-1]][2] if dropped else 0
        for i in dropped:
            del self.rows[i]
        total = sum(z for _d, _s, z, _c in self.rows.values())
        if dropped:
            # Just enough: keeping the last victim would have left the outbox over its bound.
            # Over the bound only with nothing left but devices' newest state events.
            assert total <= MAX_BYTES or all(tiers[i] == 9 for i in self.rows)
            assert total + last_size > MAX_BYTES
        if total > MAX_BYTES:
            assert all(_tier(r, self._model()) == 9 for r in self._model())

    @rule(count=st.integers(1, 5))
    def drain(self, count: int) -> None:
        batch = self.outbox.oldest(count)
        assert [r.id for r in batch] == sorted(self.rows)[:count]
        self.outbox.delete([r.id for r in batch])
        for r in batch:
            del self.rows[r.id]
            if r.device_key is not None and self.newest.get(r.device_key) == r.id:
                del self.newest[r.device_key]
        self.drained += len(batch)

    @rule(step_ms=st.integers(1_000, 80_000))
    def time_passes(self, step_ms: int) -> None:
        self.now += step_ms
        expired = self.outbox.expire()
        model = self._model()
        cutoff = self.now - MAX_AGE_MS
        expected = [i for i, d, _s in model if self.rows[i][3] < cutoff and _tier((i, d, _s), model) != 9]
        assert expired == expected
        for i in expired:
            del self.rows[i]

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.outbox.stats()
        assert stats.depth == len(self.rows)
        assert stats.bytes == sum(z for _d, _s, z, _c in self.rows.values())
        assert self.puts == stats.depth + stats.dropped_full + stats.dropped_age + self.drained

    @invariant()
    def newest_state_is_kept(self) -> None:
        assert set(self.newest.values()) <= set(self.rows)


OutboxMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_drop_policy_state_machine = OutboxMachine.TestCase


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
