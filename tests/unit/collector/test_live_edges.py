"""LiveHub edges: refused queue bounds, a closed subscription read twice, pending counts."""

from __future__ import annotations

import pytest

from micboard.collector.live import LiveHub, Topic


def test_queue_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="default_max_queue"):
        LiveHub(default_max_queue=0)
    with pytest.raises(ValueError, match="max_queue"):
        LiveHub().subscribe(max_queue=0)


async def test_a_closed_subscription_keeps_answering_none() -> None:
    hub = LiveHub(default_max_queue=2)
    subscription = hub.subscribe(sites=frozenset({"venue"}))
    assert hub.publish_alert("elsewhere", {"n": 0}) == 0  # filtered by site
    for n in range(3):
        hub.publish_alert("venue", {"n": n})
    # Bound 2: the oldest was dropped, on the subscription and on the hub.
    assert subscription.pending() == 2 and subscription.dropped == 1 and hub.stats.dropped == 1
    subscription.close()
    subscription.close()  # idempotent
    assert hub.subscriber_count == 0
    # Closing a full queue made room for the end marker by dropping one more message.
    first = await subscription.get()
    assert first is not None and first.topic is Topic.ALERT and first.data == {"n": 2}
    assert await subscription.get() is None
    assert await subscription.get() is None  # closed and empty: at once, every time
    assert [m async for m in subscription] == []
    assert hub.stats.by_topic == {"alert": 4} and hub.stats.delivered == 3
