"""EventSender with a real outbox under pressure: a full bound, a failing disk, failing queries.

Real nats-server (EmbeddedNats), real SQLite. A disk that refuses new rows is a trigger calling a
function SQLite does not have (every INSERT then fails inside its transaction, as on a full card);
a failing query is a SQLite authorizer refusing a function. What reaches the stream is checked
the way the collector replays it: per device, a delta must come with every event of its segment
before it (its snapshot and the deltas between), or the merged state mixes old and new values.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import pytest
from tests.daemon_rig import create_stream

import micboard.agent.sender as sender_module
from micboard.agent.demo_source import demo_device
from micboard.agent.outbox import OUTBOX_FILE, Outbox
from micboard.agent.publisher import EnvelopeFactory
from micboard.agent.sender import EventSender
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceBody, DeviceEvent, HelloBody, OfflineBody
from micboard.shared.natsd import EmbeddedNats

STREAM = "MICBOARD"
REFUSE_INSERTS = "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT no_such_function(); END"


async def eventually(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def tamper(path: Path, statement: str) -> None:
    """Change the outbox file from another connection, as another process (or the card) would."""
    other = sqlite3.connect(path, timeout=10)
    try:
        other.execute(statement)
        other.commit()
    finally:
        other.close()


def deny_min(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
    del arg1
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_FUNCTION and arg2 == "min" else sqlite3.SQLITE_OK


async def read_stream(url: str) -> list[AnyEvent]:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(STREAM)
        return [
            decode((await js.get_msg(STREAM, seq)).data or b"")
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await nc.close()


class Device:
    """Events of one or more devices, remembering what was sent, in order: (seq, device, kind)."""

    def __init__(self, factory: EnvelopeFactory) -> None:
        self.factory = factory
        self.sent: list[tuple[int, str | None, str]] = []

    def _keep(self, event: AnyEvent, device: str | None, kind: str) -> AnyEvent:
        self.sent.append((event.seq, device, kind))
        return event

    def snapshot(self, key: str) -> AnyEvent:
        device = demo_device().model_copy(update={"device_key": key})
        return self._keep(self.factory.make(DeviceBody(device_key=key, snapshot=device)), key, "snapshot")

    def delta(self, key: str, n: int) -> AnyEvent:
        body = DeviceBody(device_key=key, changes={"channels": {1: {"name": f"take {n}"}}})
        return self._keep(self.factory.make(body), key, "delta")

    def offline(self, key: str) -> AnyEvent:
        return self._keep(self.factory.make(OfflineBody(device_key=key)), key, "offline")

    def hello(self) -> AnyEvent:
        return self._keep(self.factory.make(HelloBody(version="t")), None, "hello")


def replay_problems(sent: list[tuple[int, str | None, str]], stream: list[AnyEvent]) -> list[str]:
    """Deltas in the stream without every earlier event of their segment (empty: replayable)."""
    present = {e.seq for e in stream}
    broken: dict[str, int] = {}
    found = []
    for seq, device, kind in sent:
        if device is None:
            continue
        if kind == "snapshot":
            if seq in present:
                broken.pop(device, None)
            else:
                broken[device] = seq
        elif kind == "delta":
            if seq not in present:
                broken.setdefault(device, seq)
            elif device in broken:
                found.append(f"{device}: delta {seq} in the stream without event {broken[device]}")
    return found


def device_order(stream: list[AnyEvent]) -> dict[str, list[int]]:
    per_device: dict[str, list[int]] = {}
    for event in stream:
        if event.kind in ("device", "offline"):
            per_device.setdefault(event.body.device_key, []).append(event.seq)
    assert len({e.seq for e in stream}) == len(stream), "duplicates in the stream"
    for key, seqs in per_device.items():
        assert seqs == sorted(seqs), f"{key} out of order"
    return per_device


@pytest.fixture
async def senders() -> AsyncIterator[list[EventSender]]:
    started: list[EventSender] = []
    yield started
    for sender in started:
        await sender.close(timeout_s=3)


async def start_sender(started: list[EventSender], url: str, outbox: Outbox, **options: float) -> EventSender:
    sender = EventSender(url, outbox, publish_timeout_s=1.0, connect_timeout_s=1.0, **options)  # type: ignore[arg-type]
    await sender.start()
    started.append(sender)
    return sender


def crash_of(sender: EventSender) -> BaseException | None:
    return sender.crashed


def loops_alive(sender: EventSender) -> bool:
    return all(not task.done() for task in sender._tasks)


# -- issue 1, end to end: a full outbox drains a replayable history ----------------------------


async def test_a_full_outbox_drains_a_history_the_collector_can_replay(
    nats_private: EmbeddedNats, tmp_path: Path, senders: list[EventSender]
) -> None:
    await create_stream(nats_private.url)
    events = Device(EnvelopeFactory("venue-t", "pi-t"))
    # Room for every device's newest state (a snapshot and up to 19 deltas), not for the outage.
    outbox = Outbox.in_state_dir(tmp_path / "agent", max_bytes=80_000)
    sender = await start_sender(senders, nats_private.url, outbox)
    await eventually(lambda: sender.stats.connected, what="connected")
    keys = [f"rx-{n}" for n in range(10)]
    for key in keys:
        await sender.send(events.snapshot(key))
    await eventually(lambda: sender.stats.acked == 10, what="the first snapshots acked")
    nats_private.stop()
    await eventually(lambda: not sender.stats.connected, what="disconnect noticed")
    # 60 events per device, a snapshot every 20: about 3 times what the bound holds.
    for n in range(600):
        key = keys[n % 10]
        await sender.send(events.snapshot(key) if (n // 10) % 20 == 19 else events.delta(key, n))
        if n % 50 == 0:
            await asyncio.sleep(0.12)  # let the group commits run, as time passes in an outage
    await eventually(lambda: sender.stats.dropped_full > 0, what="the bound reached")
    nats_private.start()
    await eventually(
        lambda: sender.stats.acked + sender.stats.dropped == 610 and sender.stats.outbox_depth == 0,
        timeout_s=30,
        what="everything acked or dropped",
    )
    stream = await read_stream(nats_private.url)
    device_order(stream)
    assert replay_problems(events.sent, stream) == []
    # After the outage each device starts again from a snapshot, then its newest state is whole.
    after = [e for e in stream if e.seq > 10]
    for key in keys:
        mine = [e for e in after if isinstance(e, DeviceEvent) and e.body.device_key == key]
        assert mine[0].body.is_snapshot, f"{key} resumes with a delta"
    newest = {key: max(s for s, d, k in events.sent if d == key and k == "snapshot") for key in keys}
    assert all(seq in {e.seq for e in stream} for seq, d, _k in events.sent if d and seq >= newest[d])
    stats = sender.stats
    assert stats.dropped_full > 0 and stats.dropped_newest == 0 and stats.dropped_io == 0


# -- issue 1, the last resort: a device cut by a tiny bound resumes at its next snapshot ------


async def test_a_device_whose_newest_deltas_were_dropped_resumes_at_its_next_snapshot(
    nats_private: EmbeddedNats, tmp_path: Path, senders: list[EventSender]
) -> None:
    nats_private.stop()
    events = Device(EnvelopeFactory("venue-t", "pi-t"))
    # Smaller than one device's newest state: a snapshot (about 1.5 kB) and 60 deltas (about 210 B).
    outbox = Outbox.in_state_dir(tmp_path / "agent", max_bytes=5_000)
    sender = await start_sender(senders, nats_private.url, outbox)
    await sender.send(events.snapshot("rx-1"))
    for n in range(60):
        await sender.send(events.delta("rx-1", n))
        await asyncio.sleep(0.01)  # several group commits: the cut happens on the way
    await eventually(lambda: sender.stats.dropped_full > 0, what="the newest deltas cut")
    cut_at = sender.stats.dropped_full
    # Until its next snapshot, a delta of the device would merge onto what was dropped: refused.
    await sender.send(events.delta("rx-1", 100))
    assert sender.stats.dropped_full == cut_at + 1
    await sender.send(events.offline("rx-1"))  # needs no base: kept
    nats_private.start()
    await create_stream(nats_private.url)
    await eventually(
        lambda: (
            sender.stats.acked + sender.stats.dropped == len(events.sent) and sender.stats.outbox_depth == 0
        ),
        timeout_s=30,
        what="the outage drained",
    )
    # Live again, and still: no delta before the device's next snapshot.
    before = sender.stats.dropped_full
    await sender.send(events.delta("rx-1", 101))
    assert sender.stats.dropped_full == before + 1
    await sender.send(events.snapshot("rx-1"))
    for n in range(102, 105):
        await sender.send(events.delta("rx-1", n))
    sent = len(events.sent)
    await eventually(lambda: sender.stats.acked + sender.stats.dropped == sent, what="all acked or dropped")
    stream = await read_stream(nats_private.url)
    device_order(stream)
    assert replay_problems(events.sent, stream) == []
    seqs = [e.seq for e in stream]
    # The first snapshot with the deltas that fitted (an unbroken run), the offline event, then
    # the next snapshot with its deltas.
    kept = len(seqs) - 5
    assert seqs[:kept] == list(range(1, kept + 1)) and kept > 10
    assert [e.kind for e in stream[kept:]] == ["offline", "device", "device", "device", "device"]
    assert seqs[kept + 1 :] == list(range(sent - 3, sent + 1))
    stats = sender.stats
    assert stats.dropped_full == stats.dropped_newest == stats.dropped and stats.dropped_io == 0


# -- issue 2: outbox errors never stop the sender's loops -------------------------------------


async def test_an_outbox_error_in_expiry_does_not_stop_the_write_loop(
    nats_private: EmbeddedNats,
    tmp_path: Path,
    senders: list[EventSender],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "_EXPIRE_EVERY_S", 0.1)
    nats_private.stop()
    events = Device(EnvelopeFactory("venue-t", "pi-t"))
    outbox = Outbox.in_state_dir(tmp_path / "agent", max_age_s=0.5)
    sender = await start_sender(senders, nats_private.url, outbox)
    for _ in range(3):
        await sender.send(events.hello())
    await eventually(lambda: sender.stats.outbox_depth == 3, what="3 events stored")
    # From now on SQLite refuses min(): expiry finds old events, drops them, then cannot tell
    # the new oldest one (and every write fails the same way).
    await sender._db(outbox._conn.set_authorizer, deny_min)
    await asyncio.sleep(0.5)  # expiry runs every 0.1 s here
    await sender.send(events.snapshot("rx-1"))
    await asyncio.sleep(0.5)
    assert loops_alive(sender)
    assert sender.crashed is None and sender.stats.outbox_errors >= 2  # expiry and the write
    await sender._db(outbox._conn.set_authorizer, None)
    # The loop went on: the old events expire, the device's events reach the disk.
    await eventually(
        lambda: sender.stats.dropped_age == 3 and sender.stats.outbox_depth == 1,
        what="old events expired and the new one stored",
    )
    await sender.send(events.delta("rx-1", 1))
    await eventually(lambda: sender.stats.outbox_depth == 2, what="the next event stored")
    assert loops_alive(sender) and sender.crashed is None and sender.stats.dropped_io == 0


# -- issue 3: a failed write keeps its acks and its events -------------------------------------


async def test_a_failed_outbox_write_keeps_its_acks_and_its_events(
    nats_private: EmbeddedNats, tmp_path: Path, senders: list[EventSender]
) -> None:
    await create_stream(nats_private.url)
    events = Device(EnvelopeFactory("venue-t", "pi-t"))
    state = tmp_path / "agent"
    sender = await start_sender(senders, nats_private.url, Outbox.in_state_dir(state))
    await eventually(lambda: sender.stats.connected, what="connected")
    await sender.send(events.snapshot("rx-1"))
    await eventually(lambda: sender.stats.acked == 1, what="the snapshot acked")
    nats_private.stop()
    await eventually(lambda: not sender.stats.connected, what="disconnect noticed")
    for n in range(40):
        await sender.send(events.delta("rx-1", n))
    await eventually(lambda: sender.stats.outbox_depth == 40, what="40 events stored")
    # The card refuses new rows from now on; deleting rows still works.
    tamper(state / OUTBOX_FILE, REFUSE_INSERTS)
    nats_private.start()
    # While the backlog drains the device keeps changing: every outbox write now has new events
    # (they wait behind the backlog) and acks, and fails.
    for n in range(40, 80):
        await sender.send(events.delta("rx-1", n))
        await asyncio.sleep(0.02)
    # Nothing is lost for it: what could not be written is sent from memory.
    await eventually(lambda: sender.stats.acked == 81, timeout_s=30, what="everything acked")
    assert sender.stats.dropped == 0 and sender.stats.dropped_io == 0
    assert sender.stats.outbox_errors >= 1
    tamper(state / OUTBOX_FILE, "DROP TRIGGER refuse")
    await eventually(lambda: sender.stats.outbox_depth == 0, timeout_s=15, what="the acked rows deleted")
    stream = await read_stream(nats_private.url)
    assert [e.seq for e in stream] == list(range(1, 82))
    await sender.close(timeout_s=3)
    # Nothing acked is left to be sent again after a restart.
    again = Outbox.in_state_dir(state).open()
    assert again.stats().depth == 0
    again.close()


async def test_events_waiting_for_a_broken_disk_are_capped_and_every_loss_is_counted(
    nats_private: EmbeddedNats, tmp_path: Path, senders: list[EventSender]
) -> None:
    nats_private.stop()
    events = Device(EnvelopeFactory("venue-t", "pi-t"))
    state = tmp_path / "agent"
    sender = await start_sender(
        senders, nats_private.url, Outbox.in_state_dir(state), max_pending_bytes=40_000
    )
    tamper(state / OUTBOX_FILE, REFUSE_INSERTS)
    keys = ["rx-1", "rx-2", "rx-3"]
    for n in range(180):
        key = keys[n % 3]
        await sender.send(events.snapshot(key) if (n // 3) % 15 == 0 else events.delta(key, n))
        if n % 20 == 0:
            await asyncio.sleep(0.12)
    await eventually(lambda: sender.stats.dropped_io > 0, timeout_s=20, what="events shed")
    assert loops_alive(sender) and sender.stats.outbox_errors >= 1
    tamper(state / OUTBOX_FILE, "DROP TRIGGER refuse")
    nats_private.start()
    await create_stream(nats_private.url)
    sent = len(events.sent)
    await eventually(
        lambda: sender.stats.acked + sender.stats.dropped == sent and sender.stats.outbox_depth == 0,
        timeout_s=30,
        what="every event acked or counted as dropped",
    )
    stream = await read_stream(nats_private.url)
    assert len(stream) == sender.stats.acked  # nothing counted as lost was sent after all
    device_order(stream)
    assert replay_problems(events.sent, stream) == []
    assert sender.stats.dropped == sender.stats.dropped_io


async def test_a_loop_that_dies_of_a_bug_is_reported(
    nats_private: EmbeddedNats, tmp_path: Path, senders: list[EventSender], caplog: pytest.LogCaptureFixture
) -> None:
    sender = await start_sender(senders, nats_private.url, Outbox.in_state_dir(tmp_path / "agent"))
    await eventually(lambda: sender.stats.connected, what="connected")
    assert sender.crashed is None
    # Corrupt what the pump reads on each round (not an outbox or link error): it dies of it.
    sender.max_in_flight = None  # type: ignore[assignment]
    await sender.send(Device(EnvelopeFactory("venue-t", "pi-t")).hello())
    await eventually(lambda: crash_of(sender) is not None, what="the crash reported")
    assert isinstance(crash_of(sender), TypeError)
    assert [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"] == ["sender task crashed"]
