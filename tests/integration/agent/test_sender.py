"""EventSender against a real nats-server and the collector's stream: store, forward, order, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from tests.daemon_rig import create_stream

from micboard.agent.demo_source import demo_device
from micboard.agent.outbox import Outbox
from micboard.agent.publisher import EnvelopeFactory
from micboard.agent.sender import EventSender
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceBody, HelloBody, MeterBody
from micboard.shared.model import ChannelMeter
from micboard.shared.natsd import EmbeddedNats

STREAM = "MICBOARD"


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


async def read_stream(url: str) -> list[tuple[str, AnyEvent]]:
    """Every message of the stream in stream order, as (Nats-Msg-Id, event)."""
    nc = await nats.connect(url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(STREAM, seq)
            out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), decode(msg.data or b"")))
        return out
    finally:
        await nc.close()


def snapshot(factory: EnvelopeFactory, key: str) -> AnyEvent:
    device = demo_device().model_copy(update={"device_key": key})
    return factory.make(DeviceBody(device_key=key, snapshot=device))


def delta(factory: EnvelopeFactory, key: str, n: int) -> AnyEvent:
    return factory.make(DeviceBody(device_key=key, changes={"channels": {1: {"name": f"take {n}"}}}))


def meter(factory: EnvelopeFactory, key: str) -> AnyEvent:
    return factory.make(MeterBody(device_key=key, channels=(ChannelMeter(index=1, audio_dbfs=-20.0),)))


def new_sender(url: str, state_dir: Path, **options: float) -> EventSender:
    return EventSender(
        url,
        Outbox.in_state_dir(state_dir),
        publish_timeout_s=options.pop("publish_timeout_s", 1.0),
        connect_timeout_s=1.0,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def sender_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[EventSender]]]:
    started: list[EventSender] = []

    async def start(url: str, state_dir: Path | None = None, **options: float) -> EventSender:
        sender = new_sender(url, state_dir or tmp_path / "agent", **options)
        await sender.start()
        started.append(sender)
        return sender

    yield start
    for sender in started:
        await sender.close(timeout_s=2)


def check_order(stream: list[tuple[str, AnyEvent]], agent: str = "pi-t") -> dict[str, list[int]]:
    """Per device, the seqs in stream order; asserts order, Msg-Ids and no duplicates."""
    per_device: dict[str, list[int]] = {}
    seen: set[str] = set()
    for mid, event in stream:
        assert mid == f"{event.agent}.{event.boot}.{event.seq}"
        assert mid not in seen, f"duplicate {mid}"
        seen.add(mid)
        if event.agent == agent and event.kind == "device":
            per_device.setdefault(event.body.device_key, []).append(event.seq)
    for key, seqs in per_device.items():
        assert seqs == sorted(seqs), f"{key} out of order: {seqs}"
    return per_device


async def test_publishes_while_the_link_is_up(
    nats_private: EmbeddedNats, tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    await create_stream(nats_private.url)
    factory = EnvelopeFactory("venue-t", "pi-t")
    sender = await sender_factory(nats_private.url)
    listener = await nats.connect(nats_private.url)
    meter_sub = await listener.subscribe("micboard.v1.venue-t.pi-t.meter")
    # Right after connecting, the first PONG can answer the connect's own PING: flush twice so
    # the server has surely registered the subscription before the meter is published.
    await listener.flush()
    await listener.flush()
    await eventually(lambda: sender.stats.connected, what="connected")
    await sender.send(factory.make(HelloBody(version="t")))
    await sender.send(snapshot(factory, "rx-1"))
    for n in range(5):
        await sender.send(delta(factory, "rx-1", n))
    await sender.send(meter(factory, "rx-1"))
    await eventually(lambda: sender.stats.acked == 7, what="7 acks")
    assert decode((await meter_sub.next_msg(timeout=5)).data).kind == "meter"
    await listener.close()
    stream = await read_stream(nats_private.url)
    assert [e.seq for _mid, e in stream] == list(range(1, 8))
    check_order(stream)
    stats = sender.stats
    assert (stats.outboxed, stats.drained, stats.dropped, stats.failures) == (0, 0, 0, 0)
    assert stats.meters_published == 1 and stats.in_flight == 0
    await eventually(lambda: sender.stats.outbox_depth == 0, what="empty outbox")


async def test_outage_goes_to_the_outbox_and_drains_in_order(
    nats_private: EmbeddedNats, tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    await create_stream(nats_private.url)
    factory = EnvelopeFactory("venue-t", "pi-t")
    sender = await sender_factory(nats_private.url, max_in_flight=2)
    await eventually(lambda: sender.stats.connected, what="connected")
    devices = ["rx-1", "rx-2", "rx-3"]
    for key in devices:
        await sender.send(snapshot(factory, key))
    await eventually(lambda: sender.stats.acked == 3, what="snapshots acked")
    nats_private.stop()
    await eventually(lambda: not sender.stats.connected, what="disconnect noticed")
    for n in range(120):  # > LANE_BUFFER per device: most of them wait on disk only
        await sender.send(delta(factory, devices[n % 3], n))
        await sender.send(meter(factory, devices[n % 3]))
    await eventually(lambda: sender.stats.outbox_depth == 120, what="120 events in the outbox")
    assert sender.stats.dropped_meter == 120 and sender.stats.outboxed == 120
    nats_private.start()
    # Live events keep flowing during the drain, after their device's backlog.
    for n in range(120, 126):
        await sender.send(delta(factory, devices[n % 3], n))
    await eventually(lambda: sender.stats.acked == 129, timeout_s=20, what="everything acked")
    await eventually(lambda: sender.stats.outbox_depth == 0, what="empty outbox")
    stream = await read_stream(nats_private.url)
    per_device = check_order(stream)
    assert sorted(seq for seqs in per_device.values() for seq in seqs) == list(range(1, 130))
    stats = sender.stats
    assert stats.drained == stats.outboxed >= 120 and stats.dropped == 0 and stats.duplicates == 0


async def test_starts_with_nats_down_and_drains_a_previous_run(
    tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    state = tmp_path / "agent"
    first = await sender_factory(server.url, state)
    old = EnvelopeFactory("venue-t", "pi-t")
    await first.send(old.make(HelloBody(version="t")))
    for n in range(10):
        await first.send(snapshot(old, "rx-1") if n == 0 else delta(old, "rx-1", n))
    await first.close(timeout_s=2)
    assert Outbox.in_state_dir(state).open().stats().depth == 11
    # A new boot, still offline: its events queue behind the old ones of the same device.
    second = await sender_factory(server.url, state)
    new = EnvelopeFactory("venue-t", "pi-t")
    await second.send(delta(new, "rx-1", 99))
    server.start()
    try:
        await create_stream(server.url)
        await eventually(lambda: second.stats.acked == 12, timeout_s=15, what="old and new events acked")
        stream = await read_stream(server.url)
        # Order is promised per lane (device), not across lanes: the agent's hello may land
        # before or after the device's events when the first publishes met no stream yet.
        device_lane = [(e.boot, e.seq) for _m, e in stream if e.kind != "hello"]
        assert device_lane == [(old.boot, n) for n in range(2, 12)] + [(new.boot, 1)]
        assert [(e.boot, e.seq) for _m, e in stream if e.kind == "hello"] == [(old.boot, 1)]
        assert second.stats.drained == 12
    finally:
        await second.close(timeout_s=2)
        server.cleanup()


async def test_close_keeps_in_flight_events_and_meets_its_deadline(
    nats_private: EmbeddedNats, tmp_path: Path
) -> None:
    # No stream, and a subscriber that swallows the publishes: they are in flight, never acked.
    sink = await nats.connect(nats_private.url)
    await sink.subscribe("micboard.v1.>", cb=_ignore)
    await sink.flush()
    factory = EnvelopeFactory("venue-t", "pi-t")
    sender = new_sender(nats_private.url, tmp_path / "agent", publish_timeout_s=30.0)
    await sender.start()
    await eventually(lambda: sender.stats.connected, what="connected")
    for key in ("rx-1", "rx-2", "rx-3", "rx-4"):
        await sender.send(snapshot(factory, key))
    await sender.send(delta(factory, "rx-1", 1))
    await eventually(lambda: sender.stats.in_flight == 4, what="4 publishes in flight")
    started = time.monotonic()
    await sender.close(timeout_s=2.0)
    assert time.monotonic() - started < 2.0
    await sender.send(delta(factory, "rx-1", 2))
    assert sender.stats.dropped_closed == 1
    await sink.close()
    outbox = Outbox.in_state_dir(tmp_path / "agent").open()
    assert [r.msg_id for r in outbox.oldest(10)] == [f"pi-t.{factory.boot}.{n}" for n in range(1, 6)]
    outbox.close()


async def _ignore(msg: Msg) -> None:
    del msg


async def test_a_too_large_event_is_refused_and_counted(
    nats_private: EmbeddedNats, tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    sender = await sender_factory(nats_private.url, max_message_bytes=1024)
    factory = EnvelopeFactory("venue-t", "pi-t")
    await sender.send(snapshot(factory, "rx-1"))
    assert sender.stats.dropped_rejected == 1 and sender.stats.dropped == 1
    assert sender.stats.outbox_depth == 0


async def test_an_unacked_publish_is_retried_until_the_stream_exists(
    nats_private: EmbeddedNats, tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    sender = await sender_factory(nats_private.url)
    factory = EnvelopeFactory("venue-t", "pi-t")
    await eventually(lambda: sender.stats.connected, what="connected")
    for n in range(3):
        await sender.send(delta(factory, "rx-1", n))
    await eventually(lambda: sender.stats.failures >= 1, what="a failed publish")
    assert sender.stats.last_publish_error is not None
    await create_stream(nats_private.url)
    await eventually(lambda: sender.stats.acked == 3, timeout_s=15, what="acks once the stream exists")
    assert [e.seq for _m, e in await read_stream(nats_private.url)] == [1, 2, 3]


def test_nc_is_exposed_for_subscriptions(tmp_path: Path) -> None:
    sender = new_sender("nats://127.0.0.1:1", tmp_path)
    assert sender.nc is None and isinstance(Client, type)


async def test_the_last_publish_error_is_cleared_by_the_next_ack(
    nats_private: EmbeddedNats, tmp_path: Path, sender_factory: Callable[..., Awaitable[EventSender]]
) -> None:
    # A failed connection, then a publish nothing acks (no stream yet): each is the current error
    # until an event is acked; from then on the heartbeat must not show it as current.
    nats_private.stop()
    sender = await sender_factory(nats_private.url)
    factory = EnvelopeFactory("venue-t", "pi-t")
    await eventually(
        lambda: (sender.stats.last_publish_error or "").startswith(("connect: ", "nats: ")),
        what="a connect error",
    )
    nats_private.start()
    await eventually(lambda: sender.stats.connected, timeout_s=15, what="connected")
    await sender.send(delta(factory, "rx-1", 1))
    await eventually(lambda: sender.stats.failures >= 1, what="an unacked publish")
    error = sender.stats.last_publish_error
    assert error is not None and not error.startswith(("connect: ", "nats: "))
    await create_stream(nats_private.url)
    await eventually(lambda: sender.stats.acked == 1, timeout_s=15, what="the event acked")
    assert sender.stats.last_publish_error is None
