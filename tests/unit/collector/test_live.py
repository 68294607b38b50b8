"""LiveHub: filters, bounded queues that drop the oldest and count, closing wakes readers."""

from __future__ import annotations

import asyncio

import pytest

from micboard.collector.live import LiveHub, Topic


async def test_filters_and_helpers() -> None:
    hub = LiveHub()
    everything = hub.subscribe()
    alerts_only = hub.subscribe(topics=frozenset({Topic.ALERT}))
    other_site = hub.subscribe(sites=frozenset({"elsewhere"}))
    assert hub.publish_device("venue", "pi-1", "dev-1", {"status": "offline"}) == 1
    assert hub.publish_alert("venue", {"change": "opened"}) == 2
    assert hub.publish_meter("venue", "pi-1", "dev-1", {"channels": []}) == 1
    first = await everything.get()
    assert first is not None and first.topic is Topic.DEVICE
    assert dict(first.data) == {"site": "venue", "agent": "pi-1", "device_key": "dev-1", "status": "offline"}
    assert everything.pending() == 2 and alerts_only.pending() == 1 and other_site.pending() == 0
    assert hub.stats.by_topic == {"device": 1, "alert": 1, "meter": 1}


async def test_slow_subscriber_drops_oldest_and_counts() -> None:
    hub = LiveHub()
    slow = hub.subscribe(max_queue=2)
    for n in range(5):
        hub.publish_alert("venue", {"n": n})
    assert slow.dropped == 3 and hub.stats.dropped == 3
    got = [await slow.get(), await slow.get()]
    assert [m.data["n"] for m in got if m is not None] == [3, 4]


async def test_close_wakes_reader_and_unsubscribes() -> None:
    hub = LiveHub()
    subscription = hub.subscribe(max_queue=1)
    hub.publish_alert("venue", {"n": 1})

    async def read_all() -> list[int]:
        return [m.data["n"] async for m in subscription]

    reader = asyncio.create_task(read_all())
    await asyncio.sleep(0)
    hub.close()
    assert await asyncio.wait_for(reader, 1) == [1] or subscription.dropped == 1
    assert hub.subscriber_count == 0
    assert await subscription.get() is None
    async with hub.subscribe() as scoped:
        assert hub.subscriber_count == 1
    assert scoped.closed and hub.subscriber_count == 0
    with pytest.raises(ValueError):
        hub.subscribe(max_queue=0)


async def test_drain_takes_what_waits_and_leaves_the_close_marker() -> None:
    hub = LiveHub()
    subscription = hub.subscribe(max_queue=8)
    for n in range(3):
        hub.publish_alert("venue", {"n": n})
    assert [m.data["n"] for m in subscription.drain()] == [0, 1, 2]
    assert subscription.drain() == []
    hub.publish_alert("venue", {"n": 3})
    subscription.close()
    assert [m.data["n"] for m in subscription.drain()] == [3]
    assert await subscription.get() is None  # the reader still learns it is closed
