"""The outbox keeps every device replayable: a delta never outlives the snapshot it builds on.

Real SQLite files throughout. The property checked everywhere (:func:`problems`): for each device,
in the order its events were written, a delta that is still in the outbox must have every event
of its segment before it (its snapshot and the deltas between) still in the outbox or already
acked; an ``offline`` event needs no base. Replaying what is left onto the collector's state
then gives a true history, never a pre-outage value merged with later deltas.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from micboard.agent.outbox import OUTBOX_FILE, Outbox, OutboxError, OutboxRecord

T0 = 1_700_000_000_000
SNAPSHOT, DELTA, OFFLINE, AGENT = "snapshot", "delta", "offline", "heartbeat"


def record(device: str | None, kind: str = DELTA, *, size: int = 100, created_ms: int = T0) -> OutboxRecord:
    """A record of exactly ``size`` bytes; ``kind`` is snapshot, delta, offline (device) or heartbeat."""
    wire_kind = {SNAPSHOT: "device", DELTA: "device", OFFLINE: "offline"}.get(kind, "heartbeat")
    subject = f"micboard.v1.s.a.{wire_kind}"
    mid = "a.b.1"
    payload = b"x" * max(0, size - len(subject) - len(mid) - len(device or ""))
    return OutboxRecord(
        subject=subject,
        msg_id=mid,
        kind=wire_kind,
        payload=payload,
        created_ms=created_ms,
        device_key=device,
        is_snapshot=kind == SNAPSHOT,
    )


def kind_of(rec: OutboxRecord) -> str:
    if rec.device_key is None:
        return AGENT
    return SNAPSHOT if rec.is_snapshot else (OFFLINE if rec.kind == "offline" else DELTA)


def open_outbox(path: Path, clock: list[int] | None = None, **options: float) -> Outbox:
    now = clock or [T0]
    return Outbox(path / OUTBOX_FILE, clock_ms=lambda: now[0], **options).open()  # type: ignore[arg-type]


def kept_ids(outbox: Outbox) -> set[int]:
    return {r.id for r in outbox.oldest(1_000_000)}


def problems(
    history: list[tuple[int, str | None, str]], kept: set[int], acked: Collection[int] = ()
) -> list[str]:
    """Kept deltas whose segment lost an earlier event, as readable lines (empty: replayable).

    ``history`` is every record written, in order, as (id, device, kind).
    """
    broken: dict[str, int] = {}  # device -> id of the lost event its current segment misses
    found = []
    for event_id, device, kind in history:
        if device is None:
            continue
        present = event_id in kept or event_id in acked
        if kind == SNAPSHOT:
            if present:
                broken.pop(device, None)
            else:
                broken[device] = event_id
        elif kind == DELTA:
            if not present:
                broken.setdefault(device, event_id)
            elif event_id in kept and device in broken:
                found.append(f"{device}: delta {event_id} kept without event {broken[device]} it builds on")
    return found


# -- the audit's scenario, scaled down --------------------------------------------------------


def test_a_full_outbox_keeps_every_device_replayable(tmp_path: Path) -> None:
    """10 devices, each a 2 kB snapshot then 59 deltas of 300 B, written well past the bound."""
    outbox = open_outbox(tmp_path, max_bytes=256 * 1024)
    history: list[tuple[int, str | None, str]] = []
    for n in range(3_000):
        device = f"rx-{n % 10}"
        snapshot = (n // 10) % 60 == 0
        rec = record(device, SNAPSHOT if snapshot else DELTA, size=2_000 if snapshot else 300)
        outbox.put(rec)
        history.append((rec.id, device, kind_of(rec)))
    stats = outbox.stats()
    assert stats.dropped_full > 0 and stats.bytes <= stats.max_bytes
    kept = kept_ids(outbox)
    assert problems(history, kept) == []
    # What is left of each device starts with a snapshot...
    first: dict[str, OutboxRecord] = {}
    for rec in outbox.oldest(1_000_000):
        first.setdefault(rec.device_key or "", rec)
    assert all(rec.is_snapshot for rec in first.values()), {
        k: r.id for k, r in first.items() if not r.is_snapshot
    }
    # ... and its newest state (newest snapshot and everything after it) is all there.
    for n in range(10):
        device = f"rx-{n}"
        mine = [(i, k) for i, d, k in history if d == device]
        newest = max(i for i, k in mine if k == SNAPSHOT)
        assert {i for i, _k in mine if i >= newest} <= kept
    assert stats.dropped_newest == 0
    outbox.close()


def test_a_dropped_snapshot_takes_the_deltas_that_build_on_it(tmp_path: Path) -> None:
    outbox = open_outbox(tmp_path, max_bytes=1_000)
    s1, d1, d2, s2, d3 = (record("rx-1", k) for k in (SNAPSHOT, DELTA, DELTA, SNAPSHOT, DELTA))
    outbox.write([s1, d1, d2, s2, d3], [])
    # 100 bytes over: the oldest superseded event is s1, and with it go its deltas.
    assert outbox.write([record("rx-2", SNAPSHOT, size=600)], []) == [s1.id, d1.id, d2.id]
    assert [r.id for r in outbox.oldest(10)][:2] == [s2.id, d3.id]
    stats = outbox.stats()
    assert (stats.dropped_full, stats.dropped_newest, stats.bytes) == (3, 0, 800)
    assert outbox.take_truncated() == set()


def test_deltas_before_a_devices_first_snapshot_go_together(tmp_path: Path) -> None:
    # Deltas whose snapshot was acked already build on the collector's state; once a newer
    # snapshot is stored they are superseded, and go as one segment.
    outbox = open_outbox(tmp_path, max_bytes=700)
    d1, d2, s1 = record("rx-1"), record("rx-1"), record("rx-1", SNAPSHOT)
    beat = record(None, AGENT)
    outbox.write([d1, beat, d2, s1], [])
    dropped = outbox.write([record("rx-2", SNAPSHOT, size=350)], [])
    # d1 is the oldest: d2 goes with it; 50 bytes over, so the heartbeat (younger) stays.
    assert dropped == [d1.id, d2.id]
    assert [r.id for r in outbox.oldest(10)][:2] == [beat.id, s1.id]


def test_drops_are_oldest_first_and_just_enough(tmp_path: Path) -> None:
    outbox = open_outbox(tmp_path, max_bytes=1_000)
    beat = record(None, AGENT)
    a1, a2, a3 = record("rx-a", SNAPSHOT), record("rx-a"), record("rx-a", SNAPSHOT)
    b1, b2 = record("rx-b", SNAPSHOT), record("rx-b")
    outbox.write([a1, beat, b1, a2, b2, a3, record("rx-b", SNAPSHOT)], [])  # 700 bytes
    # 450 over: the segments in age order: [a1, a2] (200), the heartbeat (100), [b1, b2] (200).
    dropped = outbox.write([record("rx-c", SNAPSHOT, size=750)], [])
    assert dropped == sorted([a1.id, a2.id, beat.id, b1.id, b2.id])
    assert outbox.stats().bytes == 950


# -- the age bound ----------------------------------------------------------------------------


def test_expiry_takes_the_younger_deltas_of_an_expired_snapshot(tmp_path: Path) -> None:
    clock = [T0]
    outbox = open_outbox(tmp_path, clock, max_age_s=60)
    s1 = record("rx-1", SNAPSHOT, created_ms=T0)
    d1 = record("rx-1", created_ms=T0 + 1_000)
    d2 = record("rx-1", created_ms=T0 + 50_000)  # younger than the bound at expiry time
    s2 = record("rx-1", SNAPSHOT, created_ms=T0 + 55_000)
    d3 = record("rx-1", created_ms=T0 + 56_000)
    outbox.write([s1, d1, d2, s2, d3], [])
    clock[0] = T0 + 70_000
    assert outbox.expire() == [s1.id, d1.id, d2.id]
    assert kept_ids(outbox) == {s2.id, d3.id}
    assert outbox.stats().dropped_age == 3 and outbox.stats().oldest_age_s == pytest.approx(15.0)


def test_expiry_never_leaves_a_lone_delta(tmp_path: Path) -> None:
    # A device's newest state is its newest snapshot and what followed it, as one: an old snapshot
    # with a newer delta is kept whole, never cut down to the delta.
    clock = [T0]
    outbox = open_outbox(tmp_path, clock, max_age_s=60)
    snap = record("rx-1", SNAPSHOT, created_ms=T0)
    delta = record("rx-1", created_ms=T0 + 1)
    only_deltas = [record("rx-2", created_ms=T0), record("rx-2", created_ms=T0 + 2)]
    beat = record(None, AGENT, created_ms=T0)
    outbox.write([snap, delta, *only_deltas, beat], [])
    clock[0] = T0 + 120_000
    assert outbox.expire() == [beat.id]
    assert kept_ids(outbox) == {snap.id, delta.id, only_deltas[0].id, only_deltas[1].id}


# -- the last resort: a bound smaller than the devices' newest state -------------------------


def test_last_resort_drops_newest_deltas_first_and_names_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = open_outbox(tmp_path, max_bytes=1_000)
    s1 = record("rx-1", SNAPSHOT, size=300)
    s2 = record("rx-2", SNAPSHOT, size=300)
    deltas = [record("rx-1") for _ in range(3)]
    off = record("rx-2", OFFLINE)
    outbox.write([s1, s2, *deltas, off], [])  # 1000 bytes: nothing superseded
    assert outbox.take_truncated() == set()
    with caplog.at_level(logging.WARNING, logger="micboard.agent.outbox"):
        late = record("rx-2")
        # 100 over and nothing superseded: the newest delta goes (here the one just written).
        assert outbox.put(late) == [late.id]
        s3 = record("rx-3", SNAPSHOT, size=150)
        dropped = outbox.put(s3)
    # 150 over: the newest deltas, newest first, just enough; snapshots and offline stay.
    assert dropped == [deltas[1].id, deltas[2].id]
    assert kept_ids(outbox) == {s1.id, s2.id, deltas[0].id, off.id, s3.id}
    assert outbox.take_truncated() == {"rx-1", "rx-2"} and outbox.take_truncated() == set()
    stats = outbox.stats()
    assert stats.dropped_newest == 3 and stats.dropped_full == 3 and stats.bytes == 950
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "smaller than the devices' newest state" in errors[0].getMessage()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and warnings[1].__dict__["newest_state"] == 2
    outbox.close()


def test_snapshots_and_offline_events_of_the_newest_state_are_never_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = open_outbox(tmp_path, max_bytes=500)
    with caplog.at_level(logging.ERROR, logger="micboard.agent.outbox"):
        keep = [record("rx-1", SNAPSHOT, size=300), record("rx-1", OFFLINE, size=300)]
        outbox.write(keep, [])
        assert outbox.put(record("rx-2", SNAPSHOT, size=300)) == []
    assert outbox.stats().bytes == 900 and outbox.stats().dropped_full == 0
    assert len([r for r in caplog.records if "still over its bound" in r.getMessage()]) == 1


# -- errors: always OutboxError ---------------------------------------------------------------


def deny_min(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
    """A SQLite authorizer refusing the min() function: the outbox's 'oldest event' query fails."""
    del arg1
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_FUNCTION and arg2 == "min" else sqlite3.SQLITE_OK


def test_an_error_after_expiry_is_an_outbox_error(tmp_path: Path) -> None:
    """The audit's case: the expiry itself works, finding the new oldest event then fails."""
    clock = [T0]
    outbox = open_outbox(tmp_path, clock, max_age_s=60)
    old, fresh = record(None, AGENT, created_ms=T0), record(None, AGENT, created_ms=T0 + 90_000)
    outbox.write([old, fresh], [])
    clock[0] = T0 + 100_000
    outbox._conn.set_authorizer(deny_min)
    with pytest.raises(OutboxError, match="outbox expiry failed: not authorized"):
        outbox.expire()
    # Rolled back as a whole: nothing was expired or counted, and it works again afterwards.
    assert kept_ids(outbox) == {old.id, fresh.id} and outbox.stats().dropped_age == 0
    outbox._conn.set_authorizer(None)
    assert outbox.expire() == [old.id]
    assert outbox.stats().oldest_age_s == pytest.approx(10.0)


def test_a_write_that_fails_changes_nothing_and_moves_nothing_aside(tmp_path: Path) -> None:
    outbox = open_outbox(tmp_path)
    first = record("rx-1", SNAPSHOT)
    outbox.put(first)
    outbox._conn.set_authorizer(deny_min)
    delta = record("rx-1")
    delta.id = first.id + 1  # numbered by the caller, as the sender does
    with pytest.raises(OutboxError, match="outbox write failed: not authorized"):
        outbox.write([delta], [first.id])
    outbox._conn.set_authorizer(None)
    # Not committed (the caller may write it again), and a refused statement is no corruption.
    assert kept_ids(outbox) == {first.id}
    assert (outbox.stats().depth, outbox.stats().bytes, outbox.stats().corrupt_recoveries) == (1, 100, 0)
    outbox.write([delta], [first.id])  # the same write again: it was not half done
    assert kept_ids(outbox) == {delta.id}
    assert not list(tmp_path.glob(OUTBOX_FILE + ".corrupt-*"))


def test_every_public_method_reports_sqlite_failures_as_outbox_errors(tmp_path: Path) -> None:
    clock = [T0]
    outbox = open_outbox(tmp_path, clock, max_age_s=60, max_bytes=10_000)
    outbox.write([record("rx-1", SNAPSHOT, created_ms=T0), record(None, AGENT, created_ms=T0)], [])
    clock[0] = T0 + 100_000
    # Every statement (and pragma) refused from now on, as a failing card might refuse them.
    outbox._conn.set_authorizer(lambda *_args: sqlite3.SQLITE_DENY)
    calls: dict[str, Callable[[], object]] = {
        "put": lambda: outbox.put(record("rx-2")),
        "write": lambda: outbox.write([record("rx-2")], [1]),
        "delete": lambda: outbox.delete([1]),
        "expire": outbox.expire,
        "sync": outbox.sync,
        "oldest": outbox.oldest,
        "read_lane": lambda: outbox.read_lane("rx-1"),
        "lanes": outbox.lanes,
        "max_id": outbox.max_id,
    }
    for name, call in calls.items():
        with pytest.raises(OutboxError):
            call()
        assert not outbox._conn.in_transaction, name
    assert outbox.stats().corrupt_recoveries == 0
    outbox._conn.set_authorizer(None)
    assert len(kept_ids(outbox)) == 2
    outbox.close()


# -- cost: a write at the bound does not grow with the outbox --------------------------------


def vm_steps_at_the_bound(path: Path, max_bytes: int) -> tuple[int, int]:
    """SQLite VM steps (in hundreds) of 300 writes at the bound, and how many events they dropped."""
    outbox = open_outbox(path, max_bytes=max_bytes, fsync_interval_s=60)
    n = 0

    def put() -> list[int]:
        nonlocal n
        device = f"rx-{n % 10}"
        snapshot = (n // 10) % 60 == 0
        n += 1
        return outbox.put(record(device, SNAPSHOT if snapshot else DELTA, size=2_000 if snapshot else 300))

    while outbox.stats().dropped_full == 0:
        put()
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    outbox._conn.set_progress_handler(count, 100)
    dropped = sum(len(put()) for _ in range(300))
    outbox.close()
    return steps[0], dropped


def test_a_write_at_the_bound_costs_the_same_in_a_16_times_larger_outbox(tmp_path: Path) -> None:
    small, small_dropped = vm_steps_at_the_bound(tmp_path / "small", 128 * 1024)
    large, large_dropped = vm_steps_at_the_bound(tmp_path / "large", 2 * 1024 * 1024)
    assert small_dropped > 0 and large_dropped > 0
    # Indexed lookups only: the same work per dropped event whatever the outbox holds.
    assert large / large_dropped < 2 * small / small_dropped, (small, small_dropped, large, large_dropped)


# -- the policy, as a state machine -----------------------------------------------------------

DEVICES = ("rx-1", "rx-2", "rx-3")
MAX_BYTES = 2_000
MAX_AGE_MS = 100_000


@dataclass
class Row:
    device: str | None
    kind: str
    size: int
    created_ms: int


class Model:
    """The drop policy of the module doc, computed plainly over the rows the outbox should hold."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}

    def _later_snapshot(self, row_id: int) -> int | None:
        device = self.rows[row_id].device
        later = [i for i, r in self.rows.items() if r.device == device and r.kind == SNAPSHOT and i > row_id]
        return min(later, default=None)

    def superseded(self, row_id: int) -> bool:
        return self.rows[row_id].device is None or self._later_snapshot(row_id) is not None

    def unit(self, row_id: int) -> list[int]:
        row = self.rows[row_id]
        if row.device is None:
            return [row_id]
        end = self._later_snapshot(row_id)
        assert end is not None
        return [i for i, r in sorted(self.rows.items()) if r.device == row.device and row_id <= i < end]

    def total(self) -> int:
        return sum(r.size for r in self.rows.values())

    def make_room(self) -> tuple[list[int], set[str], int]:
        """(dropped ids, devices cut, how many of them were newest state)."""
        total, taken = self.total(), set[int]()
        for row_id in sorted(self.rows):
            if total <= MAX_BYTES:
                break
            if row_id in taken or not self.superseded(row_id):
                continue
            unit = self.unit(row_id)
            taken.update(unit)
            total -= sum(self.rows[i].size for i in unit)
        cut, newest = set[str](), 0
        for row_id in sorted(self.rows, reverse=True):
            if total <= MAX_BYTES:
                break
            row = self.rows[row_id]
            if row_id in taken or row.device is None or row.kind != DELTA:
                continue
            taken.add(row_id)
            cut.add(row.device)
            newest += 1
            total -= row.size
        return sorted(taken), cut, newest

    def expired(self, cutoff: int) -> list[int]:
        taken = set[int]()
        for row_id in sorted(self.rows):
            if row_id not in taken and self.rows[row_id].created_ms < cutoff and self.superseded(row_id):
                taken.update(self.unit(row_id))
        return sorted(taken)


class ReplayableOutboxMachine(RuleBasedStateMachine):
    """Random writes, acks and clock jumps, with the sender's rule after a cut (no delta before a
    snapshot); the outbox must drop exactly what the model says and stay replayable."""

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
        self.model = Model()
        self.history: list[tuple[int, str | None, str]] = []
        self.acked: set[int] = set()
        self.cut: set[str] = set()
        self.puts = 0
        self.next_id = 0

    def teardown(self) -> None:
        self.outbox.close()
        self.dir.cleanup()

    @rule(
        batch=st.lists(
            st.tuples(
                st.sampled_from((*DEVICES, None)),
                st.sampled_from((SNAPSHOT, DELTA, DELTA, OFFLINE)),
                st.integers(50, 700),
            ),
            min_size=1,
            max_size=4,
        ),
        acks=st.integers(0, 3),
    )
    def write(self, batch: list[tuple[str | None, str, int]], acks: int) -> None:
        records = []
        for device, kind, size in batch:
            kind = AGENT if device is None else kind
            if device in self.cut:
                if kind == DELTA:
                    continue  # the sender drops it: it would build on what was cut
                if kind == SNAPSHOT:
                    self.cut.discard(device)
            rec = record(device, kind, size=size, created_ms=self.now)
            self.next_id += 1
            rec.id = self.next_id  # numbered by the caller, as the sender does: never reused
            records.append(rec)
        deletes = sorted(self.model.rows)[:acks]
        for row_id in deletes:
            del self.model.rows[row_id]
        self.acked.update(deletes)
        dropped = self.outbox.write(records, deletes)
        for rec in records:
            self.model.rows[rec.id] = Row(rec.device_key, kind_of(rec), rec.size, rec.created_ms)
            self.history.append((rec.id, rec.device_key, kind_of(rec)))
        self.puts += len(records)
        expected, cut, _newest = self.model.make_room() if self.model.total() > MAX_BYTES else ([], set(), 0)
        assert dropped == expected
        assert self.outbox.take_truncated() == cut
        if cut:
            # The last resort only once nothing superseded is left.
            assert not any(self.model.superseded(i) for i in self.model.rows if i not in dropped)
        for row_id in dropped:
            del self.model.rows[row_id]
        self.cut |= cut
        event("write: " + ("last resort" if cut else "dropped superseded" if dropped else "no drop"))
        total = self.model.total()
        if total > MAX_BYTES:
            # Over the bound only with nothing but the newest snapshots and offline events left.
            assert all(
                r.device is not None and r.kind in (SNAPSHOT, OFFLINE) for r in self.model.rows.values()
            )
            assert not any(self.model.superseded(i) for i in self.model.rows)

    @rule(step_ms=st.integers(1_000, 80_000))
    def time_passes(self, step_ms: int) -> None:
        self.now += step_ms
        expected = self.model.expired(self.now - MAX_AGE_MS)
        assert self.outbox.expire() == expected
        event("expiry: " + ("dropped" if expected else "nothing"))
        for row_id in expected:
            del self.model.rows[row_id]

    @invariant()
    def replayable(self) -> None:
        assert problems(self.history, set(self.model.rows), self.acked) == []

    @invariant()
    def holds_what_the_model_holds(self) -> None:
        assert kept_ids(self.outbox) == set(self.model.rows)
        stats = self.outbox.stats()
        assert stats.bytes == self.model.total() and stats.depth == len(self.model.rows)
        assert self.puts == stats.depth + stats.dropped_full + stats.dropped_age + len(self.acked)


ReplayableOutboxMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_replayable_policy_state_machine = ReplayableOutboxMachine.TestCase
