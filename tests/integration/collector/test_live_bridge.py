"""LiveBridge: collector processes share committed changes and alerts with each other's live views."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from micboard.collector import live_bridge
from micboard.collector.live import LiveHub, LiveMessage, Subscription, Topic
from micboard.collector.live_bridge import (
    LIVE_SUBJECT_PREFIX,
    BridgeError,
    LiveBridge,
    decode_messages,
    encode_messages,
)
from micboard.shared.natsd import EmbeddedNats


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


async def _bridged(nats_server: EmbeddedNats, origin: str, **options: Any) -> tuple[LiveHub, LiveBridge]:
    hub = LiveHub()
    bridge = LiveBridge(await nats.connect(nats_server.url), hub, origin=origin, **options)
    await bridge.start()
    return hub, bridge


async def _close(*bridges: LiveBridge) -> None:
    for bridge in bridges:
        await bridge.close()
        await bridge.nc.close()


async def _next(sub: Subscription, timeout_s: float = 3.0) -> LiveMessage:
    message = await asyncio.wait_for(sub.get(), timeout_s)
    assert message is not None
    return message


async def _until(condition: Any, timeout_s: float = 3.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_device_and_alert_messages_cross_once_in_order_and_meters_stay(
    nats_server: EmbeddedNats,
) -> None:
    hub_a, bridge_a = await _bridged(nats_server, "aaa")
    hub_b, bridge_b = await _bridged(nats_server, "bbb")
    try:
        # B heard A's announcement; A answered B's, so each knows the other at once.
        await _until(lambda: bridge_a.peers() == 1 and bridge_b.peers() == 1)
        sub_a = hub_a.subscribe()
        sub_b = hub_b.subscribe()
        committed = object()  # the committed state an in-process message carries: it stays home
        hub_a.publish_device(
            "venue", "pi-1", "rx1", {"kind": "device", "seq": 7, "channels": [2], "change": committed}
        )
        hub_a.publish_alert("venue", {"change": "opened", "alert": {"id": 3, "rule": "battery_low"}})
        hub_a.publish_meter("venue", "pi-1", "rx1", {"channels": []})
        device = await _next(sub_b)
        assert device.topic is Topic.DEVICE and device.site == "venue"
        expected = {"site": "venue", "agent": "pi-1", "device_key": "rx1", "kind": "device", "seq": 7}
        assert dict(device.data) == {**expected, "channels": [2]}
        alert = await _next(sub_b)
        assert alert.topic is Topic.ALERT and alert.data["alert"] == {"id": 3, "rule": "battery_low"}
        # B's own hub did not send them back: A's subscriber has exactly its three local messages.
        assert [m.topic for m in [await _next(sub_a) for _ in range(3)]] == [
            Topic.DEVICE,
            Topic.ALERT,
            Topic.METER,
        ]
        await asyncio.sleep(0.2)
        assert sub_a.pending() == 0 and sub_b.pending() == 0
        assert bridge_a.stats.sent == 2 and bridge_b.stats.received == 2 and bridge_b.stats.sent == 0
    finally:
        await _close(bridge_a, bridge_b)


async def test_nothing_is_forwarded_without_another_collector(nats_server: EmbeddedNats, nc: Client) -> None:
    seen: list[bytes] = []

    async def record(msg: Any) -> None:
        seen.append(msg.data)

    await nc.subscribe(f"{LIVE_SUBJECT_PREFIX}.*", cb=record)
    await nc.flush()
    hub, bridge = await _bridged(nats_server, "lone", announce_s=0.1)
    try:
        await _until(lambda: len(seen) >= 2)  # announcements, empty
        hub.publish_device("venue", "pi-1", "rx1", {"kind": "status"})
        await asyncio.sleep(0.3)
        assert all(decode_messages(data) == [] for data in seen)
        assert bridge.stats.sent == 0 and bridge.peers() == 0
        # A peer that goes quiet is forgotten after three announcement intervals.
        await nc.publish(f"{LIVE_SUBJECT_PREFIX}.other", encode_messages([]))
        await _until(lambda: bridge.peers() == 1)
        hub.publish_device("venue", "pi-1", "rx1", {"kind": "status"})
        await _until(lambda: bridge.stats.sent == 1)
        await _until(lambda: bridge.peers() == 0, timeout_s=2.0)
    finally:
        await _close(bridge)


async def test_a_connection_that_never_hears_itself_warns_and_still_bridges(
    nats_server: EmbeddedNats, nc: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # no_echo: the server never hands a connection its own messages, so the announcement that
    # proves the subscription never comes back. start() waits its bound, says so, and goes on.
    monkeypatch.setattr(live_bridge, "SUBSCRIBE_WAIT_S", 0.2)
    hub = LiveHub()
    bridge = LiveBridge(await nats.connect(nats_server.url, no_echo=True), hub, origin="deaf")
    await bridge.start()
    sub = hub.subscribe()
    try:
        assert "own announcement not seen back" in caplog.text
        good = LiveMessage(Topic.DEVICE, "venue", {"agent": "pi-1", "device_key": "rx1", "kind": "status"})
        await nc.publish(f"{LIVE_SUBJECT_PREFIX}.peer", encode_messages([good]))
        assert await _next(sub) == good
        assert bridge.peers() == 1
    finally:
        await _close(bridge)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "m": []}),
        msgpack.packb({"v": 1, "m": [["meter", "venue", {}]]}),
        msgpack.packb({"v": 1, "m": [["device", "venue", {"agent": "pi-1"}]]}),
        msgpack.packb(
            {"v": 1, "m": [["device", "venue", {"agent": "pi-1", "device_key": "rx", "channels": ["x"]}]]}
        ),
        msgpack.packb(
            {"v": 1, "m": [["device", "venue", {"agent": "pi-1", "device_key": "rx", "gone": [2.0]}]]}
        ),
        msgpack.packb({"v": 1, "m": [["alert", 5, {}]]}),
        msgpack.packb({"v": 1, "m": [["alert", "venue"]]}),
        msgpack.packb({"v": 1, "m": [[["device"], "venue", {}]]}),
    ],
)
async def test_bad_payloads_are_counted_and_the_bridge_goes_on(
    nats_server: EmbeddedNats, nc: Client, payload: bytes
) -> None:
    hub, bridge = await _bridged(nats_server, "victim")
    sub = hub.subscribe()
    try:
        await nc.publish(f"{LIVE_SUBJECT_PREFIX}.evil", payload)
        await _until(lambda: bridge.stats.bad == 1)
        good = LiveMessage(Topic.DEVICE, "venue", {"agent": "pi-1", "device_key": "rx1", "kind": "status"})
        await nc.publish(f"{LIVE_SUBJECT_PREFIX}.peer", encode_messages([good]))
        assert await _next(sub) == good
        assert bridge.stats.received == 1 and bridge.stats.bad == 1
    finally:
        await _close(bridge)


async def test_a_failed_publish_is_counted(
    nats_server: EmbeddedNats, nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    hub, bridge = await _bridged(nats_server, "cut", announce_s=0.05)
    try:
        await nc.publish(f"{LIVE_SUBJECT_PREFIX}.peer", encode_messages([]))
        await _until(lambda: bridge.peers() == 1)
        await bridge.nc.close()
        hub.publish_alert("venue", {"change": "opened", "alert": {"id": 1}})
        await _until(lambda: bridge.stats.failed == 1)
        assert bridge.stats.sent == 0
        # The announcements fail too, and say so; the silent peer is forgotten, so forwarding stops.
        await _until(lambda: "live bridge announcement failed" in caplog.text and bridge.peers() == 0)
        hub.publish_alert("venue", {"change": "opened", "alert": {"id": 2}})
        await asyncio.sleep(0.1)
        assert bridge.stats.failed == 1
    finally:
        await bridge.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_bridge_error(payload: bytes) -> None:
    try:
        messages = decode_messages(payload)
    except BridgeError:
        return
    assert all(m.topic in (Topic.DEVICE, Topic.ALERT) for m in messages)


@given(
    st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, "1"]), "m": st.lists(st.lists(_json, max_size=4) | _json, max_size=4)}
    )
    | _json
)
def test_any_msgpack_structure_decodes_or_raises_bridge_error(body: Any) -> None:
    try:
        messages = decode_messages(msgpack.packb(body))
    except BridgeError:
        return
    assert isinstance(body, dict) and len(messages) == len(body["m"])


@given(
    st.lists(
        st.builds(
            lambda site, extra, channels, gone: LiveMessage(
                Topic.DEVICE,
                site,
                {"agent": "pi-1", "device_key": "rx", "channels": channels, "gone": gone, **extra},
            ),
            st.text(max_size=10),
            st.dictionaries(st.sampled_from(["kind", "seq", "summary"]), _json, max_size=3),
            st.none() | st.lists(st.integers(0, 64), max_size=4),
            st.none() | st.lists(st.integers(1, 64), max_size=4),
        )
        | st.builds(
            lambda site, data: LiveMessage(Topic.ALERT, site, data),
            st.text(max_size=10),
            st.dictionaries(st.text(max_size=5), _json, max_size=3),
        ),
        max_size=5,
    )
)
def test_messages_survive_the_round_trip(messages: list[LiveMessage]) -> None:
    assert decode_messages(encode_messages(messages)) == messages
