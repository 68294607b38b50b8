"""IngestConsumer against a real nats-server and real SQLite / PostgreSQL: every kind, duplicates,
reordering, poison, an event that breaks the transaction, and two consumers on one durable."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.ingest import APPLY_FAILED, IngestConsumer
from micboard.collector.services.alerts import AlertChange, AlertService, DeviceTransition
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema import agents, applied_events, devices, discovered, poison_events
from micboard.collector.store.schema_alerts import alerts as alerts_table
from micboard.shared.codec import encode
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    DiscoveredBody,
    HeartbeatBody,
    HelloBody,
    OfflineBody,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor, apply_changes
from micboard.shared.natsd import EmbeddedNats
from micboard.shared.subjects import build_subject


def settings_for(server: EmbeddedNats, tmp_path: Path, **overrides: Any) -> CollectorSettings:
    """Settings with short timers so that retries happen within a test."""
    values: dict[str, Any] = {
        "nats_url": server.url,
        "state_dir": tmp_path,
        "fetch_timeout_s": 0.2,
        "ack_wait_s": 2.0,
        "redelivery_backoff_s": [1.0],
        "max_deliver": 4,
        "retry_delay_s": 0.05,
        "retry_max_delay_s": 0.2,
    }
    values.update(overrides)
    return CollectorSettings(**values)


def receiver(key: str, channels: int = 2) -> Device:
    return Device(
        device_key=key,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4D",
        channels=tuple(
            ReceiverChannel(index=i, name=f"HH0{i} Person", transmitter=Transmitter(battery_bars=5))
            for i in range(1, channels + 1)
        ),
    )


@pytest.fixture
async def nc(nats_private: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_private.url)
    yield client
    await client.close()


async def publish(nc: Client, events: Sequence[AnyEvent]) -> None:
    publisher = JetStreamPublisher(nc)
    for item in events:
        await publisher.publish(item)


# How long ingest may make no progress at all before a wait fails. The waits below give up on a
# stall, not on a total: on a loaded 2-core machine the same work can take several times longer,
# and a fixed deadline would fail a run that was slow but never stuck (pytest-timeout still caps it).
STALL_S = 30.0


async def drain(ingest: IngestConsumer, done: Callable[[], bool], stall_s: float = STALL_S) -> None:
    """Run batches until ``done()`` holds; fail if no counter of ``ingest.stats`` moved for ``stall_s``."""
    loop = asyncio.get_running_loop()

    def counters() -> tuple[object, ...]:
        # last_batch_ms is a duration, not progress.
        return dataclasses.astuple(dataclasses.replace(ingest.stats, last_batch_ms=0.0))

    seen = counters()
    moved_at = loop.time()
    while not done():
        now = counters()
        if now != seen:
            seen, moved_at = now, loop.time()
        assert loop.time() - moved_at < stall_s, f"no progress in {stall_s} s: {ingest.stats}"
        await ingest.run_once()


async def until_counted(
    measure: Callable[[], Awaitable[int]],
    target: int,
    check: Callable[[], None] = lambda: None,
    stall_s: float = STALL_S,
    describe: Callable[[], object] = lambda: "",
) -> None:
    """Poll ``measure()`` until it reaches ``target``; fail if it did not grow for ``stall_s``."""
    loop = asyncio.get_running_loop()
    best = await measure()
    moved_at = loop.time()
    while best < target:
        check()
        assert loop.time() - moved_at < stall_s, f"stuck at {best} of {target} for {stall_s} s {describe()}"
        await asyncio.sleep(0.1)
        value = await measure()
        if value > best:
            best, moved_at = value, loop.time()


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def stored_device(engine: AsyncEngine, agent: str, key: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (
            (await conn.execute(select(devices).where(devices.c.agent == agent, devices.c.device_key == key)))
            .mappings()
            .one()
        )
    return dict(row)


async def test_every_kind_is_applied(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    events = [
        factory.make(HelloBody(version="1.2", hostname="pi")),
        factory.make(HeartbeatBody(uptime_s=1.0, outbox_depth=2)),
        factory.make(DeviceBody(device_key="rx", snapshot=receiver("rx"))),
        factory.make(DeviceBody(device_key="rx", changes={"name": "Stage left"})),
        factory.make(OfflineBody(device_key="rx")),
        factory.make(DiscoveredBody(source="mdns", address="10.0.0.7", port=2202, model="ULXD4D")),
    ]
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path))
    await ingest.start()
    await publish(nc, events)
    await drain(ingest, lambda: ingest.stats.events >= len(events))
    assert ingest.stats.outcomes == {"applied": 6}
    row = await stored_device(engine, "pi-1", "rx")
    assert (row["status"], row["name"], row["last_seq"]) == ("offline", "Stage left", 5)
    async with engine.connect() as conn:
        agent = (await conn.execute(select(agents))).mappings().one()
        found = (await conn.execute(select(discovered))).mappings().one()
    assert (agent["version"], agent["outbox_depth"], agent["status"]) == ("1.2", 2, "online")
    assert (found["identity"], found["model"]) == ("10.0.0.7:2202", "ULXD4D")
    assert await count(engine, applied_events) == 6


async def test_duplicates_and_reordering_give_the_in_order_state(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    snapshot = factory.make(DeviceBody(device_key="rx", snapshot=receiver("rx")))
    assert isinstance(snapshot, DeviceEvent)
    deltas = [
        factory.make(DeviceBody(device_key="rx", changes={"channels": {1: {"name": "HH01 Ada"}}})),
        factory.make(DeviceBody(device_key="rx", changes={"firmware": "2.7"})),
        factory.make(DeviceBody(device_key="rx", changes={"channels": {2: {"frequency_khz": 578_000}}})),
        factory.make(DeviceBody(device_key="rx", changes={"channels": {1: {"name": "HH01 Grace"}}})),
    ]
    expected = snapshot.body.snapshot
    assert expected is not None
    for delta in deltas:
        expected = apply_changes(expected, delta.body.changes or {})  # type: ignore[union-attr]
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path, batch_size=3))
    await ingest.start()
    js = nc.jetstream()
    # Newest first, and every event twice under different Msg-Ids so that NATS does not drop
    # the copies: the database has to deduplicate and order them.
    for item in [snapshot, *reversed(deltas), *deltas, snapshot]:
        await js.publish(build_subject(item.site, item.agent, item.kind), encode(item))
    await drain(ingest, lambda: ingest.stats.events >= 10)
    assert ingest.stats.outcomes["duplicate"] == 5
    row = await stored_device(engine, "pi-1", "rx")
    assert Device.model_validate(row["state"]) == expected
    assert row["last_seq"] == deltas[-1].seq
    assert await count(engine, applied_events) == 5


async def test_delta_before_its_snapshot_is_retried_until_it_applies(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    snapshot = factory.make(DeviceBody(device_key="rx", snapshot=receiver("rx")))
    delta = factory.make(DeviceBody(device_key="rx", changes={"model": "ULXD4Q"}))
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path, batch_size=1))
    await ingest.start()
    await publish(nc, [delta, snapshot])
    await drain(ingest, lambda: ingest.stats.outcomes.get("applied", 0) >= 2)
    assert ingest.stats.outcomes["deferred"] >= 1
    assert (await stored_device(engine, "pi-1", "rx"))["model"] == "ULXD4Q"


async def test_poison_is_terminated_kept_and_counted_without_blocking_the_batch(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    good = factory.make(HelloBody(version="1"))
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path))
    await ingest.start()
    js = nc.jetstream()
    unknown_version = msgpack.packb({**good.model_dump(mode="python"), "v": 99, "seq": 50})
    await js.publish("micboard.v1.venue.pi-1.hello", b"\xc1not msgpack")
    await js.publish("micboard.v1.venue.pi-1.hello", unknown_version)
    await js.publish("micboard.v1.other.pi-1.hello", encode(good))  # site disagrees with subject
    await publish(nc, [good])
    await drain(ingest, lambda: ingest.stats.events >= 4)
    assert ingest.stats.poison_by_code == {"wire.garbage": 1, "wire.unknown_version": 1, "wire.invalid": 1}
    assert ingest.stats.outcomes == {"applied": 1}
    async with engine.connect() as conn:
        rows = (await conn.execute(select(poison_events).order_by(poison_events.c.id))).mappings().all()
    assert [r["code"] for r in rows] == ["wire.garbage", "wire.unknown_version", "wire.invalid"]
    assert rows[0]["data"] == b"\xc1not msgpack" and rows[0]["stream_seq"] == 1
    # Terminated: nothing is redelivered.
    await asyncio.sleep(0.3)
    assert await ingest.run_once() == 0


async def test_the_configured_message_size_is_the_one_ingest_accepts(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    # Over the 256 KiB default, under the configured 512 KiB: the stream stores it, so ingest
    # must apply it rather than dead-letter it as too large.
    large = factory.make(HelloBody(version="1", config={"note": "x" * 300_000}))
    larger = factory.make(HelloBody(version="1", config={"note": "x" * 600_000}))
    settings = settings_for(nats_private, tmp_path, max_message_bytes=512 * 1024)
    ingest = IngestConsumer(nc, engine, settings)
    await ingest.start()
    js = nc.jetstream()
    await js.publish("micboard.v1.venue.pi-1.hello", encode(large, max_bytes=1024 * 1024))
    # The stream refuses what is over its own limit, the same setting: nothing to dead-letter.
    with pytest.raises(nats.js.errors.APIError):
        await js.publish("micboard.v1.venue.pi-1.hello", encode(larger, max_bytes=1024 * 1024))
    await drain(ingest, lambda: ingest.stats.events >= 1)
    assert ingest.stats.outcomes == {"applied": 1}
    assert ingest.stats.poison_by_code == {}


async def _refuse_device(engine: AsyncEngine, key: str) -> None:
    """A real database trigger that fails any insert of device ``key``: a stand-in for a bad row."""
    async with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_device BEFORE INSERT ON devices "
                    f"WHEN NEW.device_key = '{key}' BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_device() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.device_key = '{key}' THEN RAISE EXCEPTION 'refused by trigger'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_device BEFORE INSERT ON devices "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_device()"
                )
            )


async def test_an_event_that_breaks_the_transaction_is_isolated_then_dead_lettered(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    await _refuse_device(engine, "explodes")
    factory = EnvelopeFactory("venue", "pi-1")
    events = [factory.make(DeviceBody(device_key=f"rx-{i}", snapshot=receiver(f"rx-{i}"))) for i in range(3)]
    events.insert(1, factory.make(DeviceBody(device_key="explodes", snapshot=receiver("explodes"))))
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path))
    await ingest.start()
    await publish(nc, events)
    await drain(ingest, lambda: ingest.stats.dead_lettered >= 1)
    assert ingest.stats.failed_batches >= 1
    # The good ones were applied on the first delivery, the bad one tried max_deliver times.
    assert await count(engine, devices) == 3
    assert ingest.stats.outcomes == {"applied": 3}
    async with engine.connect() as conn:
        [row] = (await conn.execute(select(poison_events))).mappings().all()
    assert row["code"] == APPLY_FAILED and "refused by trigger" in row["reason"]
    assert row["deliveries"] == 4 and row["subject"] == "micboard.v1.venue.pi-1.device"
    assert await count(engine, applied_events) == 3


async def test_two_consumers_share_the_durable_and_apply_each_event_once(
    nats_private: EmbeddedNats, db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    rng = random.Random(5)
    factories = [EnvelopeFactory("venue", f"pi-{a}") for a in range(4)]
    events: list[AnyEvent] = []
    expected: dict[tuple[str, str], Device] = {}
    for factory in factories:
        events.append(factory.make(HelloBody(version="1")))
        for d in range(3):
            device = receiver(f"rx-{d}")
            events.append(factory.make(DeviceBody(device_key=device.device_key, snapshot=device)))
            expected[factory.agent, device.device_key] = device
    for step in range(400):
        factory = rng.choice(factories)
        key = f"rx-{rng.randrange(3)}"
        channel = rng.choice([1, 2])
        changes: dict[str, Any] = rng.choice(
            [
                {"channels": {channel: {"transmitter": {"battery_bars": rng.randrange(6)}}}},
                {"channels": {channel: {"name": f"HH0{channel} P{step}"}}},
                {"firmware": f"fw-{step}"},
                {"name": f"rx {step}"},
            ]
        )
        events.append(factory.make(DeviceBody(device_key=key, changes=changes)))
        expected[factory.agent, key] = apply_changes(expected[factory.agent, key], changes)
    first_nc = await nats.connect(nats_private.url)
    second_nc = await nats.connect(nats_private.url)
    second_engine = create_engine(db_url)
    try:
        # Each agent's events are split between the two consumers, so one often holds an event
        # whose predecessor the other has not committed yet: it defers it (nak, redelivered after
        # the backoff). The deferral must outlast the other consumer's batch however loaded the
        # machine is: 4 deliveries 1 s apart (settings_for) did not, and dead-lettered events.
        settings = settings_for(
            nats_private, tmp_path, batch_size=16, redelivery_backoff_s=[0.5], max_deliver=120
        )
        consumers = [
            IngestConsumer(first_nc, engine, settings),
            IngestConsumer(second_nc, second_engine, settings),
        ]
        for consumer in consumers:
            await consumer.start()
        tasks = [asyncio.create_task(c.run()) for c in consumers]
        await publish(first_nc, events)

        def consumers_alive() -> None:
            assert not any(t.done() for t in tasks)

        await until_counted(
            lambda: count(engine, applied_events),
            len(events),
            consumers_alive,
            describe=lambda: [c.stats for c in consumers],
        )
        for consumer in consumers:
            consumer.stop()
        await asyncio.gather(*tasks)
    finally:
        await first_nc.close()
        await second_nc.close()
        await second_engine.dispose()
    assert all(c.stats.events > 0 for c in consumers), "both consumers took part"
    assert [c.stats.dead_lettered for c in consumers] == [0, 0]
    assert await count(engine, applied_events) == len(events)
    for (agent, key), device in expected.items():
        row = await stored_device(engine, agent, key)
        assert Device.model_validate(row["state"]) == device, (agent, key)


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    settings = settings_for(nats_private, tmp_path, batch_size=200)
    ingest = IngestConsumer(nc, engine, settings)
    await ingest.start()
    factory = EnvelopeFactory("venue", "pi-1")
    snapshots = [
        factory.make(DeviceBody(device_key=f"rx-{i}", snapshot=receiver(f"rx-{i}"))) for i in range(50)
    ]
    await publish(nc, snapshots)
    await drain(ingest, lambda: ingest.stats.events >= 50)
    sizes = []
    for n in (5, 150):
        deltas = [
            factory.make(
                DeviceBody(device_key=f"rx-{i % 50}", changes={"channels": {1: {"name": f"HH01 {i}"}}})
            )
            for i in range(n)
        ]
        await publish(nc, deltas)
        event.listen(engine.sync_engine, "before_cursor_execute", record)
        before, batches = ingest.stats.events, ingest.stats.batches
        await drain(ingest, lambda before=before, n=n: ingest.stats.events >= before + n)  # type: ignore[misc]
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        assert ingest.stats.batches == batches + 1, "one fetch took the whole backlog"
        sizes.append(len(statements))
        statements.clear()
    # Claim, site, stale agents, agent, devices (select, update), channels.
    assert sizes[0] == sizes[1] <= 8, sizes


class _AlertsFailingHalfway(AlertService):
    """Opens its alerts, then fails: what a bug in a rule would do in the middle of a batch."""

    async def evaluate_devices(
        self, conn: AsyncConnection, changes: Sequence[DeviceTransition], *, now_ms: int | None = None
    ) -> list[AlertChange]:
        opened = await super().evaluate_devices(conn, changes, now_ms=now_ms)
        assert opened, "the battery should have opened alerts before the failure"
        raise RuntimeError("rule exploded")


async def test_a_failing_alert_evaluation_costs_neither_the_state_nor_the_event(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    low = Device(
        device_key="rx-low",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(ReceiverChannel(index=1, transmitter=Transmitter(battery_bars=1)),),
    )
    ingest = IngestConsumer(
        nc, engine, settings_for(nats_private, tmp_path), alerts=_AlertsFailingHalfway(engine)
    )
    await ingest.start()
    await publish(nc, [EnvelopeFactory("venue", "pi-1").make(DeviceBody(device_key="rx-low", snapshot=low))])
    await drain(ingest, lambda: ingest.stats.events >= 1)
    # The state committed and the event was acked; the alert rows written before the failure
    # were rolled back with their savepoint.
    assert ingest.stats.outcomes == {"applied": 1} and ingest.stats.alert_failures == 1
    assert ingest.stats.failed_batches == 0
    assert await count(engine, devices) == 1
    assert await count(engine, alerts_table) == 0


async def test_start_without_device_state_to_load_logs_and_binds(
    nats_private: EmbeddedNats, nc: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database the schema is not in yet: loading device state fails, ingest still starts.
    empty = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    try:
        ingest = IngestConsumer(nc, empty, settings_for(nats_private, tmp_path))
        await ingest.start()
        assert ingest._fetcher is not None
        assert "could not load device state at start" in caplog.text
    finally:
        await empty.dispose()


async def test_a_batch_is_topped_up_with_what_arrived_while_the_one_before_was_applied(
    nats_private: EmbeddedNats, nc: Client, engine: AsyncEngine, tmp_path: Path
) -> None:
    factory = EnvelopeFactory("venue", "pi-1")
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path, batch_size=5))
    await ingest.start()
    assert ingest._fetcher is not None
    await publish(nc, [factory.make(DeviceBody(device_key="rx", snapshot=receiver("rx")))])
    # What the prefetch took early: one event. Six more arrive before the batch is applied.
    prefetched = await ingest._fetcher.fetch(5, 2.0)
    later = [factory.make(DeviceBody(device_key="rx", changes={"name": f"Rack {n}"})) for n in range(6)]
    await publish(nc, later)
    batch = await ingest._top_up(ingest._decode(prefetched))
    # Topped up to the batch size, oldest first; the last event waits for the next batch.
    assert [event.seq for _msg, event in batch.good] == [1, 2, 3, 4, 5]
    await ingest._apply_decoded(batch)
    await drain(ingest, lambda: ingest.stats.events >= 7)
    assert ingest.stats.outcomes == {"applied": 7}
    assert (await stored_device(engine, "pi-1", "rx"))["name"] == "Rack 5"


async def test_a_failed_top_up_applies_the_batch_in_hand(
    nats_private: EmbeddedNats,
    nc: Client,
    engine: AsyncEngine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingest = IngestConsumer(nc, engine, settings_for(nats_private, tmp_path, batch_size=5))
    await ingest.start()
    assert ingest._fetcher is not None
    await publish(nc, [EnvelopeFactory("venue", "pi-1").make(HelloBody(version="1", hostname="pi"))])
    batch = ingest._decode(await ingest._fetcher.fetch(5, 2.0))
    await nc.close()  # the link goes: the top-up's request cannot be sent
    assert await ingest._top_up(batch) is batch
    assert ingest.stats.fetch_errors == 1
    assert "top-up fetch failed" in caplog.text
