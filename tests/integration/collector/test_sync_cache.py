"""The device state a SynchronizationService keeps between batches, on SQLite and PostgreSQL.

Two services on one database stand for two collectors sharing the consumer: a copy another
collector has overwritten must never be written back.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.services.sync import ApplyOutcome, BatchChanges, SynchronizationService
from micboard.collector.store.schema import agents, devices, sites
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    HelloBody,
    HelloEvent,
    OfflineBody,
    OfflineEvent,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor


def envelope(seq: int, *, agent: str = "pi-1", boot: str = "b1", ts: int | None = None) -> dict[str, Any]:
    return {
        "site": "venue",
        "agent": agent,
        "boot": boot,
        "seq": seq,
        "ts": ts if ts is not None else 1000 + seq,
    }


def receiver(key: str = "dev-1", channels: int = 2) -> Device:
    return Device(
        device_key=key,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4D",
        channels=tuple(
            ReceiverChannel(index=i, name=f"HH0{i} Person", transmitter=Transmitter(battery_percent=100))
            for i in range(1, channels + 1)
        ),
    )


def battery(seq: int, channel: int, percent: int, key: str = "dev-1", **env: Any) -> DeviceEvent:
    changes = {"channels": {channel: {"transmitter": {"battery_percent": percent}}}}
    return DeviceEvent(**envelope(seq, **env), body=DeviceBody(device_key=key, changes=changes))


def snapshot(seq: int, key: str = "dev-1", **env: Any) -> DeviceEvent:
    return DeviceEvent(**envelope(seq, **env), body=DeviceBody(device_key=key, snapshot=receiver(key)))


async def run(
    engine: AsyncEngine, service: SynchronizationService, events: list[AnyEvent], *, remember: bool = True
) -> BatchChanges:
    async with engine.begin() as conn:
        changes = await service.apply_batch_changes(conn, events)
    if remember:
        service.committed(changes)
    return changes


async def device_row(engine: AsyncEngine, key: str = "dev-1") -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(devices).where(devices.c.device_key == key))).one()


def percents(state: dict[str, Any]) -> dict[int, int]:
    return {c["index"]: c["transmitter"]["battery_percent"] for c in state["channels"]}


async def test_a_copy_another_collector_overwrote_is_read_again(engine: AsyncEngine) -> None:
    one, two = SynchronizationService(), SynchronizationService()
    await run(engine, one, [snapshot(1)])
    await run(engine, one, [battery(2, 1, 90)])  # one now holds revision 1 in memory
    await run(engine, two, [battery(3, 2, 80)])  # the other collector writes revision 2
    changes = await run(engine, one, [battery(4, 1, 70)])
    row = await device_row(engine)
    # Both deltas survive: one noticed its copy was old and read the device again.
    assert percents(row.state) == {1: 70, 2: 80}
    assert row.revision == 3
    [change] = changes.devices
    assert change.before is not None and percents(change.before) == {1: 90, 2: 80}


def shuffled_events(agent: str) -> list[AnyEvent]:
    """Snapshots of four devices, then deltas and offlines in a fixed random order."""
    rng = random.Random(7)
    events: list[AnyEvent] = [snapshot(1 + d, key=f"dev-{d}", agent=agent) for d in range(4)]
    for seq in range(10, 90):
        key = f"dev-{rng.randrange(4)}"
        if rng.random() < 0.1:
            events.append(OfflineEvent(**envelope(seq, agent=agent), body=OfflineBody(device_key=key)))
        else:
            events.append(battery(seq, rng.randrange(1, 3), rng.randrange(101), key=key, agent=agent))
    tail = events[4:]
    rng.shuffle(tail)  # out of order, as redeliveries and several collectors make them
    return events[:4] + tail


async def test_the_cache_changes_no_result(engine: AsyncEngine) -> None:
    """The same events applied with the memory, with a memory that evicts, and without: same rows."""
    cached, small = SynchronizationService(), SynchronizationService(device_cache=2)
    for agent, service in (("pi-a", cached), ("pi-b", small), ("pi-c", None)):
        events = shuffled_events(agent)
        for i in range(0, len(events), 7):
            await run(
                engine, service or SynchronizationService(), events[i : i + 7], remember=service is not None
            )
    assert len(small._devices) <= 2
    async with engine.connect() as conn:
        rows = (await conn.execute(select(devices))).all()
    by_agent: dict[str, dict[str, tuple[Any, ...]]] = {}
    for row in rows:
        by_agent.setdefault(row.agent, {})[row.device_key] = (
            row.state,
            row.reported_status,
            row.last_seq,
            row.base_seq,
            row.field_seq,
        )
    assert len(by_agent["pi-c"]) == 4
    assert by_agent["pi-a"] == by_agent["pi-c"]
    assert by_agent["pi-b"] == by_agent["pi-c"]


async def test_a_rolled_back_batch_is_not_remembered(engine: AsyncEngine) -> None:
    service = SynchronizationService()
    await run(engine, service, [snapshot(1)])
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await service.apply_batch_changes(conn, [battery(2, 1, 10)])
            raise RuntimeError("the transaction fails after the writes")
    # Not committed, so not remembered: the next batch builds on the stored state.
    changes = await run(engine, service, [battery(3, 2, 20)])
    [change] = changes.devices
    assert change.before is not None and percents(change.before) == {1: 100, 2: 100}
    assert percents((await device_row(engine)).state) == {1: 100, 2: 20}
    # The rolled-back event was never claimed: its redelivery applies.
    assert (await run(engine, service, [battery(2, 1, 10)])).results[0].outcome is ApplyOutcome.APPLIED
    assert percents((await device_row(engine)).state) == {1: 10, 2: 20}


async def test_touches_skipped_within_the_resolution_still_restore_a_stale_agent(engine: AsyncEngine) -> None:
    service = SynchronizationService()
    await run(engine, service, [HelloEvent(**envelope(1), body=HelloBody(version="1")), snapshot(2)])
    async with engine.connect() as conn:
        seen = (await conn.execute(select(sites.c.last_seen_ms))).scalar_one()
    async with engine.begin() as conn:
        became = await service.mark_stale_agents(conn, now_ms=seen + 10**9)
    assert became == ["pi-1"]
    # The agent row was written a moment ago, so this batch does not rewrite it; the agent and
    # its devices are brought back all the same.
    changes = await run(engine, service, [battery(3, 1, 50)])
    assert changes.agents_back == [("venue", "pi-1")]
    async with engine.connect() as conn:
        assert (await conn.execute(select(agents.c.status))).scalar_one() == "online"
    assert (await device_row(engine)).status == "online"


async def test_a_warmed_service_keeps_the_latest_devices_and_still_checks_revisions(
    engine: AsyncEngine,
) -> None:
    writer = SynchronizationService()
    await run(engine, writer, [snapshot(s, key=f"dev-{s}") for s in (1, 2, 3)])
    await run(engine, writer, [battery(4, 1, 90, key="dev-1")])  # dev-1 written last
    started = SynchronizationService(device_cache=2)
    async with engine.connect() as conn:
        assert await started.warm(conn) == 2
        assert await SynchronizationService().warm(conn, limit=0) == 0
    # The two written last, the latest kept last (evicted last).
    assert list(started._devices) == [("pi-1", "dev-3"), ("pi-1", "dev-1")]
    assert percents(started._devices["pi-1", "dev-1"].state) == {1: 90, 2: 100}
    # Another collector writes dev-1 after the start: the warmed copy is read again.
    await run(engine, writer, [battery(5, 2, 80, key="dev-1")])
    changes = await run(engine, started, [battery(6, 1, 70, key="dev-1")])
    assert percents((await device_row(engine)).state) == {1: 70, 2: 80}
    [change] = changes.devices
    assert change.before is not None and percents(change.before) == {1: 90, 2: 80}
