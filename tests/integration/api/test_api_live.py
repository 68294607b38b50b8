"""The live WebSocket: auth, snapshots by scope, deltas after applied events, meters, slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import nats
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from tests import live_messages
from tests.waiting import until

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.api import live_ws
from micboard.collector.api.auth import TOKEN_CACHE_S, Role, TokenStore
from micboard.collector.api.context import context_of
from micboard.collector.app import Collector
from micboard.collector.services.alerts import AlertService
from micboard.collector.settings import CollectorSettings
from micboard.shared.codec import encode
from micboard.shared.envelope import DeviceBody, HelloBody, MeterBody, OfflineBody
from micboard.shared.model import ChannelMeter, Device, Transmitter
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.live_api import LiveApi


async def _sqlite_live_api(
    tmp_path: Path, nats_server: EmbeddedNats, api_factory: Callable[..., AsyncIterator[LiveApi]]
) -> AsyncIterator[LiveApi]:
    from micboard.collector.store.database import create_engine, create_schema

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'live.db'}")
    await create_schema(engine)
    async for live in api_factory(engine, nats_server.url, live_queue_messages=8):
        yield live
    await engine.dispose()


@pytest.fixture
async def sqlite_api(
    tmp_path: Path, nats_server: EmbeddedNats, api_factory: Callable[..., AsyncIterator[LiveApi]]
) -> AsyncIterator[LiveApi]:
    """The API on SQLite only: live behaviour does not depend on the database."""
    async for live in _sqlite_live_api(tmp_path, nats_server, api_factory):
        yield live


@pytest.fixture
async def keepalive_api(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    api_factory: Callable[..., AsyncIterator[LiveApi]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[LiveApi]:
    """:func:`sqlite_api` with a keepalive every 0.2 s (set before the feed starts)."""
    monkeypatch.setattr(live_ws, "KEEPALIVE_S", 0.2)
    async for live in _sqlite_live_api(tmp_path, nats_server, api_factory):
        yield live


async def connect(
    api: LiveApi, role: str | None = "viewer", token: str | None = None
) -> aiohttp.ClientWebSocketResponse:

    ws = await api.http.ws_connect(f"{api.url}/api/v1/live")
    if role is not None or token is not None:
        await ws.send_json(
            {"type": "auth", "token": token if token is not None else api.tokens[role or "viewer"]}
        )
    return ws


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 3.0) -> dict[str, Any]:
    """The next message on ``ws``, as a client must read them, checking the batching rules."""
    return await live_messages.next_message(ws, timeout_s, check_batches=True)


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout_s: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        data = await next_message(ws, deadline - time.monotonic())
        if data["type"] == kind:
            return data


async def test_auth_is_required(sqlite_api: LiveApi, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = await connect(sqlite_api, token="mbt_wrong")
    msg = await ws.receive(timeout=3)
    assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4401
    ws = await sqlite_api.http.ws_connect(f"{sqlite_api.url}/api/v1/live")
    await ws.send_json({"type": "subscribe", "scope": "fleet"})
    await ws.receive(timeout=3)
    assert ws.close_code == 4401
    monkeypatch.setattr(live_ws, "AUTH_TIMEOUT_S", 0.2)
    ws = await sqlite_api.http.ws_connect(f"{sqlite_api.url}/api/v1/live")
    started = time.monotonic()
    await ws.receive(timeout=3)
    assert ws.close_code == 4401 and time.monotonic() - started < 2


async def test_a_revoked_tokens_connections_are_closed(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    store = TokenStore(api.engine)
    here, here_token = await store.create("wall-screen", Role.VIEWER)
    elsewhere, elsewhere_token = await store.create("laptop", Role.VIEWER)
    sockets = {}
    for name, token in (("here", here_token), ("elsewhere", elsewhere_token), ("kept", api.tokens["viewer"])):
        ws = await connect(api, token=token)
        await ws.send_json({"type": "subscribe", "scope": "fleet"})
        await next_of(ws, "snapshot")
        sockets[name] = ws
    # Revoked through the API: its connection closes at once.
    status, _body, _ = await api.call("DELETE", f"/api/v1/tokens/{here.id}", role="admin")
    assert status == 204
    msg = await sockets["here"].receive(timeout=3)
    assert msg.type is aiohttp.WSMsgType.CLOSE and sockets["here"].close_code == 4401
    assert msg.extra == "auth.revoked"
    # Revoked by another collector or the CLI (straight in the store): found by the periodic
    # check, within the time a REST call with it would still pass on a cached verdict.
    assert await TokenStore(api.engine).revoke(elsewhere.id)
    msg = await sockets["elsewhere"].receive(timeout=TOKEN_CACHE_S + 3)
    assert msg.type is aiohttp.WSMsgType.CLOSE and sockets["elsewhere"].close_code == 4401
    # Other tokens' connections go on, through further checks.
    with pytest.raises(TimeoutError):
        await sockets["kept"].receive(timeout=1.0)
    assert not sockets["kept"].closed
    feed = context_of(api.app).live
    assert feed is not None and feed.stats.revoked == 2
    # Open connections count a client that never subscribes; subscribed clients do not.
    idle = await connect(api)
    await until(lambda: feed.open_connections == 2)
    assert feed.stats.clients == 1
    await idle.close()
    await sockets["kept"].close()


async def test_snapshots_by_scope(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1"), api.receiver("rx2")])
    await api.seed.devices("venue-b", "pi-b", [api.receiver("rx3", bars=(1,))])
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "fleet"})
    snapshot = await next_of(ws, "snapshot")
    assert len(snapshot["channels"]) == 5 and {s["site"] for s in snapshot["sites"]} == {"venue-a", "venue-b"}
    _, listed = await api.get("/api/v1/channels")
    assert snapshot["channels"] == listed["items"]

    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-b"})
    snapshot = await next_of(ws, "snapshot")
    assert [(c["device_key"], c["battery_state"]) for c in snapshot["channels"]] == [("rx3", "critical")]
    assert [s["site"] for s in snapshot["sites"]] == ["venue-b"]

    _, group, _ = await api.call(
        "POST",
        "/api/v1/groups",
        role="operator",
        json={"name": "g", "channels": [{"device_id": 2, "index": 2}, {"device_id": 3, "index": 1}]},
    )
    await ws.send_json({"type": "subscribe", "scope": "group", "group_id": group["id"]})
    snapshot = await next_of(ws, "snapshot")
    assert sorted((c["device_id"], c["index"]) for c in snapshot["channels"]) == [(2, 2), (3, 1)]
    assert sorted(s["site"] for s in snapshot["sites"]) == ["venue-a", "venue-b"]

    await ws.send_json({"type": "subscribe", "scope": "group", "group_id": 999})
    error = await next_of(ws, "error")
    assert error["code"] == "live.invalid_subscription"
    await ws.send_json({"type": "subscribe", "scope": "fleet", "meters": "no"})
    error = await next_of(ws, "error")
    assert error["code"] == "live.invalid_subscription" and "meters must be true or false" in error["detail"]
    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-a", "channels": False})
    error = await next_of(ws, "error")
    assert "false only for scope 'fleet'" in error["detail"]
    await ws.send_str("not json")
    assert (await next_of(ws, "error"))["code"] == "live.invalid_message"
    await ws.close()


def _reading(index: int, audio: float) -> ChannelMeter:
    return ChannelMeter(
        index=index,
        rf_dbm=(-50.0, -70.0),
        active_antenna="A",
        antenna_states=("active", "red"),
        audio_dbfs=audio,
        audio_peak_dbfs=audio + 3,
        link_quality_percent=90,
    )


async def test_meters_come_batched_per_tick_and_latest_wins(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-m", "pi-m", [api.receiver("rx1"), api.receiver("rx2")])
    await api.seed.devices("venue-n", "pi-n", [api.receiver("rx3")])
    site = await connect(api)
    await site.send_json({"type": "subscribe", "scope": "site", "site": "venue-m"})
    ids = {c["device_key"]: c["device_id"] for c in (await next_of(site, "snapshot"))["channels"]}
    fleet = await connect(api)
    await fleet.send_json({"type": "subscribe", "scope": "fleet"})
    ids |= {c["device_key"]: c["device_id"] for c in (await next_of(fleet, "snapshot"))["channels"]}
    # A view that shows no live levels (the dashboard's site cards) asks for none.
    quiet = await connect(api)
    await quiet.send_json({"type": "subscribe", "scope": "fleet", "meters": False})
    await next_of(quiet, "snapshot")
    publisher = await nats.connect(api.nc.connected_url.geturl() if api.nc.connected_url else "")
    factories = {"pi-m": EnvelopeFactory("venue-m", "pi-m"), "pi-n": EnvelopeFactory("venue-n", "pi-n")}
    started = time.monotonic()
    last = -60.0
    for step in range(60):
        last = -60.0 + step * 0.5
        for agent, key, indexes in (("pi-m", "rx1", (1, 2)), ("pi-m", "rx2", (1,)), ("pi-n", "rx3", (1, 2))):
            body = MeterBody(device_key=key, channels=tuple(_reading(i, last) for i in indexes))
            site_name = "venue-m" if agent == "pi-m" else "venue-n"
            await publisher.publish(
                f"micboard.v1.{site_name}.{agent}.meter", encode(factories[agent].make(body))
            )
        await asyncio.sleep(0.01)
    await publisher.publish("micboard.v1.venue-m.pi-m.meter", b"\xc1 garbage")
    await publisher.flush()
    await publisher.close()

    async def drain(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
        batches = []
        with pytest.raises(TimeoutError):
            while True:
                batches.append(await next_of(ws, "meters", timeout_s=0.5))
        return batches

    by_site, by_fleet = await drain(site), await drain(fleet)
    assert await drain(quiet) == []
    elapsed = time.monotonic() - started
    for batches in (by_site, by_fleet):
        # One message per tick (10 Hz), however many channels moved in it; each channel once.
        assert 1 <= len(batches) <= elapsed * 10 + 2, (len(batches), elapsed)
        for batch in batches:
            keys = [(m["device_id"], m["index"]) for m in batch["items"]]
            assert len(keys) == len(set(keys))
    site_keys = {(m["device_id"], m["index"]) for b in by_site for m in b["items"]}
    fleet_keys = {(m["device_id"], m["index"]) for b in by_fleet for m in b["items"]}
    assert site_keys == {(ids["rx1"], 1), (ids["rx1"], 2), (ids["rx2"], 1)}
    assert fleet_keys == site_keys | {(ids["rx3"], 1), (ids["rx3"], 2)}
    latest = {(m["device_id"], m["index"]): m for b in by_fleet for m in b["items"]}
    assert latest[(ids["rx2"], 1)] == {
        "device_id": ids["rx2"],
        "index": 1,
        "rf_dbm": [-50.0, -70.0],
        "active_antenna": "A",
        "antenna_states": ["active", "red"],
        "audio_dbfs": last,
        "audio_peak_dbfs": last + 3,
        "link_quality_percent": 90,
    }
    assert all(m["audio_dbfs"] == last for m in latest.values())
    feed = context_of(api.app).live
    assert feed is not None and feed.stats.meters_bad >= 1 and feed.stats.meters_received >= 181
    await site.close()
    await fleet.close()
    await quiet.close()


async def test_subscribers_of_one_scope_share_one_snapshot(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(5, 4)), api.receiver("rx2")])
    await api.seed.devices("venue-b", "pi-b", [api.receiver("rx3")])
    feed = context_of(api.app).live
    assert feed is not None
    built = feed.stats.snapshots

    async def subscribe(scope: dict[str, Any]) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        ws = await connect(api)
        await ws.send_json({"type": "subscribe", **scope})
        return ws, await next_of(ws, "snapshot")

    # While the feed is busy (a flush or another snapshot holds its lock, as under load), eight
    # clients ask for the fleet: they wait in line and get one snapshot, read and serialized once.
    async with feed._lock, asyncio.timeout(10):
        tasks = [asyncio.create_task(subscribe({"scope": "fleet"})) for _ in range(8)]
        while sum(len(waiting) for waiting in feed._joining.values()) < 8:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    joined = await asyncio.gather(*tasks)
    assert feed.stats.snapshots == built + 1 and feed.stats.snapshots_shared == 7
    assert all(snapshot == joined[0][1] for _, snapshot in joined)
    _, listed = await api.get("/api/v1/channels")
    assert joined[0][1]["channels"] == listed["items"]

    # A change: every client hears of it once, and the next subscriber's snapshot shows it.
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(1, 4))])
    api.hub.publish_device("venue-a", "pi-a", "rx1", {"kind": "device", "seq": 99})
    for ws, _ in joined:
        item = (await next_of(ws, "channel"))["item"]
        assert (item["device_key"], item["index"], item["battery_state"]) == ("rx1", 1, "critical")
    built = feed.stats.snapshots
    late, snapshot = await subscribe({"scope": "fleet"})
    assert feed.stats.snapshots == built + 1
    assert [c["battery_state"] for c in snapshot["channels"] if c["device_key"] == "rx1"] == [
        "critical",
        "good",
    ]
    for ws in [late, *(ws for ws, _ in joined)]:
        await ws.close()


async def test_a_snapshot_tells_subscribed_clients_what_it_read_first(sqlite_api: LiveApi) -> None:
    """A change committed but not flushed yet when another scope's snapshot reads it reaches the
    clients already subscribed right away (it used to be lost: the flush found it already known)."""
    api = sqlite_api
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(5, 4))])
    fleet = await connect(api)
    await fleet.send_json({"type": "subscribe", "scope": "fleet"})
    await next_of(fleet, "snapshot")
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(2, 4))])
    site = await connect(api)
    await site.send_json({"type": "subscribe", "scope": "site", "site": "venue-a"})
    snapshot = await next_of(site, "snapshot")
    assert [c["battery_state"] for c in snapshot["channels"]] == ["critical", "good"]
    item = (await next_of(fleet, "channel"))["item"]
    assert (item["index"], item["battery_state"]) == (1, "critical")
    # The flush of that change comes later and finds nothing new to send.
    api.hub.publish_device("venue-a", "pi-a", "rx1", {"kind": "device", "seq": 99})
    for ws in (fleet, site):
        with pytest.raises(TimeoutError):
            await next_of(ws, "channel", timeout_s=0.5)
        await ws.close()


async def test_deltas_of_one_flush_reach_a_client_as_one_batch_frame(sqlite_api: LiveApi) -> None:
    """Several channel deltas arriving together are one ``batch`` frame: every item, in order."""
    api = sqlite_api
    keys = ["rx1", "rx2", "rx3", "rx4"]
    await api.seed.devices("venue-b", "pi-b", [api.receiver(key, bars=(5, 4)) for key in keys])
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-b"})
    await next_of(ws, "snapshot")
    feed = context_of(api.app).live
    assert feed is not None
    frames = feed.stats.frames
    # Four devices change while the feed is busy (as under load): one flush finds them all.
    async with feed._lock:
        await api.seed.devices("venue-b", "pi-b", [api.receiver(key, bars=(1, 2)) for key in keys])
        for n, key in enumerate(keys):
            api.hub.publish_device("venue-b", "pi-b", key, {"kind": "device", "seq": 100 + n})
        while feed._pending.devices != {("pi-b", key) for key in keys}:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    assert msg.data.startswith('{"type":"batch","items":[')
    batch = json.loads(msg.data)
    channels = [item["item"] for item in batch["items"] if item["type"] == "channel"]
    # The items are the channel messages as they were, in the order of the listing, none lost.
    _, listed = await api.get("/api/v1/channels?site=venue-b")
    assert channels == listed["items"]
    assert [(c["device_key"], c["index"], c["battery_state"]) for c in channels] == [
        (key, index, "critical") for key in keys for index in (1, 2)
    ]
    assert {item["type"] for item in batch["items"]} <= {"channel", "site"}
    assert feed.stats.frames == frames + 1
    await ws.close()


async def test_a_fleet_of_site_cards_gets_its_sites_without_every_channel(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-c", "pi-c", [api.receiver("rx1", bars=(5, 4))])
    cards = await connect(api)
    await cards.send_json({"type": "subscribe", "scope": "fleet", "channels": False, "meters": False})
    snapshot = await next_of(cards, "snapshot")
    assert snapshot["channels"] == [] and [s["site"] for s in snapshot["sites"]] == ["venue-c"]
    tiles = await connect(api)
    await tiles.send_json({"type": "subscribe", "scope": "fleet"})
    assert len((await next_of(tiles, "snapshot"))["channels"]) == 2

    async def types(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
        seen: list[str] = []
        with contextlib.suppress(TimeoutError):
            while True:
                message = json.loads((await ws.receive(timeout=1.5)).data)
                parts = message["items"] if message["type"] == "batch" else [message]
                seen += [part["type"] for part in parts]
        return seen

    # The receiver's batteries drop: its tiles change, not its site's card.
    await api.seed.devices("venue-c", "pi-c", [api.receiver("rx1", bars=(1, 2))])
    api.hub.publish_device("venue-c", "pi-c", "rx1", {"kind": "device", "seq": 100})
    seen_by_cards, seen_by_tiles = await types(cards), await types(tiles)
    assert "channel" in seen_by_tiles and "channel" not in seen_by_cards, seen_by_cards
    # It goes offline: the card's counts change, and the cards client hears of it.
    await api.seed.offline("venue-c", "pi-c", "rx1")
    api.hub.publish_device("venue-c", "pi-c", "rx1", {"kind": "offline", "seq": 101})
    seen_by_cards = await types(cards)
    assert "site" in seen_by_cards and "channel" not in seen_by_cards, seen_by_cards
    await cards.close()
    await tiles.close()


async def test_what_is_queued_at_one_wake_up_goes_out_in_bounded_batches(
    sqlite_api: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends queued before the writer runs share frames, in order, within the bounds of a batch; a
    snapshot is a frame of its own, and so is a message bigger than a batch may be."""
    monkeypatch.setattr(live_ws, "_BATCH_MAX_ITEMS", 3)
    monkeypatch.setattr(live_ws, "_BATCH_MAX_BYTES", 160)
    ws = await connect(sqlite_api)
    await ws.send_json({"type": "subscribe", "scope": "fleet"})
    await next_of(ws, "snapshot")
    feed = context_of(sqlite_api.app).live
    assert feed is not None
    (client,) = feed._fleet_clients

    def alert(n: int, pad: int = 0) -> bytes:
        return orjson.dumps({"type": "alert", "item": {"n": n, "pad": "x" * pad}})

    snapshot = orjson.dumps({"type": "snapshot", "channels": [], "sites": []})
    # Queued without yielding: the writer wakes once, with all of it waiting.
    feed._offer(client, [alert(0), alert(1)])
    feed._offer(client, [alert(2)])
    assert client.offer([snapshot], alone=True)
    feed._offer(client, [alert(n) for n in range(3, 10)])
    feed._offer(client, [alert(10, pad=200)])
    feed._offer(client, [alert(11)])
    expected = [*(alert(n) for n in range(3)), snapshot, *(alert(n) for n in range(3, 10))]
    expected += [alert(10, pad=200), alert(11)]
    received: list[dict[str, Any]] = []
    raw: list[str] = []
    while len(received) < len(expected):
        msg = await ws.receive(timeout=3)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        raw.append(msg.data)
        data = json.loads(msg.data)
        received += data["items"] if data["type"] == "batch" else [data]
    assert received == [json.loads(m) for m in expected]
    for text in raw:
        data = json.loads(text)
        if data["type"] == "batch":
            assert 2 <= len(data["items"]) <= 3 and len(text) <= 160, text
            assert all(item["type"] == "alert" for item in data["items"])
    # The first three share a frame (the bounds allow three), then the snapshot comes as itself,
    # and so does the oversized message; nothing waits after them.
    assert [item["item"]["n"] for item in json.loads(raw[0])["items"]] == [0, 1, 2]
    assert json.loads(raw[1]) == json.loads(snapshot)
    assert any(json.loads(text) == json.loads(alert(10, pad=200)) for text in raw)
    assert json.loads(raw[-1]) == json.loads(alert(11))
    with pytest.raises(TimeoutError):
        await ws.receive(timeout=0.3)
    await ws.close()


async def test_a_slow_client_is_dropped_and_others_keep_up(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-s", "pi-s", [api.receiver("rx1")])
    fast = await connect(api)
    await fast.send_json({"type": "subscribe", "scope": "fleet"})
    await next_of(fast, "snapshot")
    slow = await connect(api)
    await slow.send_json({"type": "subscribe", "scope": "fleet"})
    # The slow client stops reading here; its socket buffers fill, then its 8-message queue.
    received = 0

    async def read_fast() -> None:
        nonlocal received
        while received < 300:
            await next_of(fast, "alert", timeout_s=10)
            received += 1

    reader = asyncio.create_task(read_fast())
    big = "x" * 65_536
    for n in range(300):
        alert = {
            "id": n + 1,
            "site": "venue-s",
            "agent": "pi-s",
            "device_key": "rx1",
            "channel": 1,
            "rule": "battery_low",
            "severity": "warning",
            "state": "open",
            "message": big,
            "opened_ms": int(time.time_ns() // 1_000_000),
        }
        api.hub.publish_alert("venue-s", {"change": "opened", "alert": alert})
        # A producer no faster than a client that keeps up: the fast one never has 4 waiting.
        while received < n - 3 and not reader.done():  # noqa: ASYNC110 - polling the reader's count
            await asyncio.sleep(0.001)
    await asyncio.wait_for(reader, 20)
    assert received == 300
    feed = context_of(api.app).live
    assert feed is not None and feed.stats.slow_dropped == 1
    # Once it reads again, the slow client finds what was buffered, then the close (1013).
    while True:
        msg = await slow.receive(timeout=15)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
    assert slow.close_code == 1013
    await fast.close()


async def test_a_quiet_fleet_still_sends_keepalives(keepalive_api: LiveApi) -> None:
    """With nothing to tell, clients still hear from the server: silence means a dead link."""
    subscribed = await connect(keepalive_api)
    await subscribed.send_json({"type": "subscribe", "scope": "fleet"})
    assert (await next_message(subscribed))["type"] == "snapshot"
    waiting = await connect(keepalive_api)  # authenticated, not subscribed: nothing yet
    for _ in range(3):
        message = await live_messages.next_message(subscribed, 3.0, keepalives=True)
        assert message["type"] == "keepalive" and isinstance(message["ts_ms"], int), message
    with pytest.raises(TimeoutError):
        await waiting.receive(timeout=0.5)
    await subscribed.close()
    await waiting.close()


async def _watching_a_replace_and_a_good_tile(api: LiveApi) -> aiohttp.ClientWebSocketResponse:
    """A client of site venue-t, whose receiver's channel 1 reads replace (3 bars), channel 2 good."""
    await api.seed.devices("venue-t", "pi-t", [api.receiver("rx1", bars=(3, 5))])
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-t"})
    snapshot = await next_of(ws, "snapshot")
    assert [c["battery_state"] for c in snapshot["channels"]] == ["replace", "good"]
    return ws


async def test_a_thresholds_change_recolours_the_sites_tiles_at_once(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    ws = await _watching_a_replace_and_a_good_tile(api)
    change = {"site": "venue-t", "values": {"battery_replace_bars": 2, "battery_critical_bars": 1}}
    status, body, _ = await api.call("PUT", "/api/v1/thresholds", role="admin", json=change)
    assert status == 200, body
    item = (await next_of(ws, "channel"))["item"]
    assert (item["index"], item["battery_state"]) == (1, "good")
    # Only what changed is sent: channel 2 read good before and after.
    with pytest.raises(TimeoutError):
        await next_message(ws, timeout_s=0.5)
    await ws.close()


async def test_reconnecting_client_gets_a_fresh_snapshot(sqlite_api: LiveApi) -> None:
    api = sqlite_api
    await api.seed.devices("venue-r", "pi-r", [api.receiver("rx1", bars=(5,))])
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-r"})
    assert (await next_of(ws, "snapshot"))["channels"][0]["battery_state"] == "good"
    await ws.close()
    await api.seed.devices("venue-r", "pi-r", [api.receiver("rx1", bars=(2,))])
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-r"})
    assert (await next_of(ws, "snapshot"))["channels"][0]["battery_state"] == "critical"
    await ws.close()


async def test_deltas_follow_events_applied_by_ingest(
    nats_private: EmbeddedNats, sqlite_url: str, tmp_path: Path, make_receiver: Callable[..., Device]
) -> None:
    token = "mbt_live-test-token-0123456789abcdefghij"
    settings = CollectorSettings(
        nats_url=nats_private.url,
        database_url=sqlite_url,
        http_port=0,
        state_dir=tmp_path,
        fetch_timeout_s=0.2,
        bootstrap_token=token,
    )
    collector = Collector(settings)
    running = await collector.start()
    nc = await nats.connect(nats_private.url)
    try:
        publisher = JetStreamPublisher(nc)
        factory = EnvelopeFactory("venue-l", "pi-l")
        device = make_receiver("rx1", bars=(5, 4))
        await publisher.publish(factory.make(HelloBody(version="1.0")))
        await publisher.publish(factory.make(DeviceBody(device_key="rx1", snapshot=device)))
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                async with http.get(
                    f"{running.url}/api/v1/channels", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    if (await r.json())["total"] == 2 or time.monotonic() > deadline:
                        break
                await asyncio.sleep(0.05)
            ws = await http.ws_connect(f"{running.url}/api/v1/live")
            await ws.send_json({"type": "auth", "token": token})
            await ws.send_json({"type": "subscribe", "scope": "site", "site": "venue-l"})
            snapshot = await next_of(ws, "snapshot")
            assert [c["battery_state"] for c in snapshot["channels"]] == ["good", "good"]

            sent = time.monotonic()
            tx = Transmitter(
                model="ULXD2",
                battery_bars=1,
                battery_percent=8,
                runtime_min=10,
                battery_type="LION",
                muted=False,
            )
            await publisher.publish(
                factory.make(
                    DeviceBody(device_key="rx1", changes={"channels": {1: {"transmitter": tx.model_dump()}}})
                )
            )
            item = (await next_of(ws, "channel", timeout_s=10))["item"]
            assert time.monotonic() - sent < 2
            assert (item["index"], item["battery_state"], item["tx"]["battery_percent"]) == (1, "critical", 8)

            await publisher.publish(
                factory.make(DeviceBody(device_key="rx1", changes={"channels": {2: {"transmitter": None}}}))
            )
            item = (await next_of(ws, "channel", timeout_s=10))["item"]
            assert (item["index"], item["tx"]) == (2, None)
            assert item["battery_state"] in ("unknown", "previously_good")

            await publisher.publish(factory.make(OfflineBody(device_key="rx1")))
            statuses = {(await next_of(ws, "channel", timeout_s=10))["item"]["status"] for _ in range(2)}
            assert statuses == {"offline"}
            # Site summaries also follow the alerts ingest opened on the way (battery low and
            # critical, then device offline); the one showing the device offline still ranks the
            # site critical, since the battery alerts stay open.
            site = (await next_of(ws, "site", timeout_s=10))["item"]
            while site["devices"]["offline"] != 1:
                site = (await next_of(ws, "site", timeout_s=10))["item"]
            assert (site["site"], site["worst"]) == ("venue-l", "critical")
            assert site["open_alerts"] == 3

            # Reconfigured to one channel: the second channel's tile must go, not linger.
            device_id = item["device_id"]
            await publisher.publish(
                factory.make(DeviceBody(device_key="rx1", snapshot=make_receiver("rx1", bars=(5,))))
            )
            removed = (await next_of(ws, "channel_removed", timeout_s=10))["item"]
            expected = {
                "site": "venue-l",
                "agent": "pi-l",
                "device_key": "rx1",
                "device_id": device_id,
                "index": 2,
            }
            assert removed == expected
            async with http.get(
                f"{running.url}/api/v1/channels", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert [(c["device_id"], c["index"]) for c in (await r.json())["items"]] == [(device_id, 1)]
            await ws.close()
    finally:
        await nc.close()
        await collector.stop()


async def test_live_needs_a_hub(engine: AsyncEngine) -> None:
    from aiohttp import web

    from micboard.collector.api.app import create_app
    from micboard.collector.services.devices import DeviceService

    app = create_app(DeviceService(engine))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/live") as r,
        ):
            assert r.status == 503 and (await r.json(content_type=None))["code"] == "service.unavailable"
    finally:
        await runner.cleanup()


async def test_shutdown_closes_every_socket_even_before_auth(sqlite_api: LiveApi) -> None:
    """A socket still authenticating or not yet subscribed is closed (going away) at shutdown,
    so the HTTP runner is not left waiting on its handler."""
    silent = await sqlite_api.http.ws_connect(f"{sqlite_api.url}/api/v1/live")
    unsubscribed = await connect(sqlite_api)
    subscribed = await connect(sqlite_api)
    await subscribed.send_json({"type": "subscribe", "scope": "fleet"})
    await next_of(subscribed, "snapshot")
    live = context_of(sqlite_api.app).live
    assert live is not None
    await live.close()
    for ws in (silent, unsubscribed, subscribed):
        msg = await ws.receive(timeout=3)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=3)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


@pytest.fixture
async def refreshing_api(sqlite_api: LiveApi, monkeypatch: pytest.MonkeyPatch) -> LiveApi:
    """The API with one device on venue-a and the live feed's site refresh every 0.2 s."""
    monkeypatch.setattr(live_ws, "SITE_REFRESH_S", 0.2)
    await sqlite_api.seed.devices("venue-a", "pi-a", [sqlite_api.receiver("rx1")])
    return sqlite_api


async def test_the_site_refresh_shows_what_changed_without_an_event(refreshing_api: LiveApi) -> None:
    """Counts that move with no event for the live feed (a stale mark, here a direct write)."""
    api = refreshing_api
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "fleet"})
    [before] = (await next_of(ws, "snapshot"))["sites"]
    await api.seed.offline("venue-a", "pi-a", "rx1")  # the store only: the hub hears nothing
    after = (await next_of(ws, "site", timeout_s=15))["item"]
    assert after["site"] == "venue-a" and after != before
    _, listed = await api.get("/api/v1/sites")
    assert [after] == listed["items"]
    await ws.close()


async def test_thresholds_changed_elsewhere_recolour_the_tiles_within_a_refresh(
    refreshing_api: LiveApi,
) -> None:
    """Another collector process (or the CLI) changed a site's thresholds: no message tells this one."""
    api = refreshing_api
    ws = await _watching_a_replace_and_a_good_tile(api)
    # Straight into the store, as another process sharing the database does.
    await AlertService(api.engine).change_site_thresholds(
        "venue-t", {"battery_replace_bars": 2, "battery_critical_bars": 1}
    )
    item = (await next_of(ws, "channel", timeout_s=10))["item"]
    assert (item["index"], item["battery_state"]) == (1, "good")
    # Told once: later refreshes find nothing new, and channel 2 read good before and after.
    with pytest.raises(TimeoutError):
        await next_of(ws, "channel", timeout_s=1.0)
    await AlertService(api.engine).change_site_thresholds(
        "venue-t", {}, reset=["battery_replace_bars", "battery_critical_bars"]
    )
    item = (await next_of(ws, "channel", timeout_s=10))["item"]
    assert (item["index"], item["battery_state"]) == (1, "replace")
    await ws.close()


async def test_the_site_refresh_never_shows_an_older_read_than_a_flush_did(
    refreshing_api: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh reads outside the lock: a flush may show a newer summary meanwhile."""
    api = refreshing_api
    feed = context_of(api.app).live
    assert feed is not None
    real_list_sites = feed.fleet.list_sites
    armed, refresh_read, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_refresh(*args: Any, **kwargs: Any) -> Any:
        found = await real_list_sites(*args, **kwargs)
        # Once armed, the only read of every site is the refresh's (the snapshot came before).
        if armed.is_set() and kwargs.get("only") is None and not refresh_read.is_set():
            # The refresh's read is done, with the device online; its answer is held back.
            refresh_read.set()
            await release.wait()
        return found

    monkeypatch.setattr(feed.fleet, "list_sites", slow_refresh)
    ws = await connect(api)
    await ws.send_json({"type": "subscribe", "scope": "fleet"})
    [online] = (await next_of(ws, "snapshot"))["sites"]
    armed.set()
    await asyncio.wait_for(refresh_read.wait(), timeout=15)
    # Meanwhile the device goes offline and a flush shows the site as it is now.
    await api.seed.offline("venue-a", "pi-a", "rx1")
    api.hub.publish_device("venue-a", "pi-a", "rx1", {"kind": "offline", "seq": 99})
    offline = (await next_of(ws, "site", timeout_s=5))["item"]
    assert offline != online
    release.set()
    # The refresh's older read is not shown after it, and later refreshes find nothing new.
    with pytest.raises(TimeoutError):
        await next_of(ws, "site", timeout_s=1.5)
    await ws.close()


async def test_a_collector_that_only_serves_shows_what_another_ingests(
    nats_private: EmbeddedNats, db_url: str, tmp_path: Path, make_receiver: Callable[..., Device]
) -> None:
    """Ingest in one collector process, the dashboard's live view in another (``ingest=False``):
    applied changes and the alerts they open reach the serving one's clients over the live bridge,
    and what its API changes (an acknowledged alert) reaches the ingesting one's."""
    token = "mbt_live-test-token-0123456789abcdefghij"
    common = {
        "nats_url": nats_private.url, "database_url": db_url, "http_port": 0, "fetch_timeout_s": 0.2,
        "bootstrap_token": token, "auto_migrate": "always",
    }  # fmt: skip
    ingesting = Collector(CollectorSettings(state_dir=tmp_path / "ingest", **common))  # type: ignore[arg-type]
    serving = Collector(CollectorSettings(state_dir=tmp_path / "serve", ingest=False, **common))  # type: ignore[arg-type]
    ingester = await ingesting.start()
    server = await serving.start()
    nc = await nats.connect(nats_private.url)
    try:
        assert server.ingest is None and ingester.ingest is not None
        publisher = JetStreamPublisher(nc)
        factory = EnvelopeFactory("venue-s", "pi-s")
        await publisher.publish(factory.make(HelloBody(version="1.0")))
        await publisher.publish(
            factory.make(DeviceBody(device_key="rx1", snapshot=make_receiver("rx1", bars=(5, 4))))
        )
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"{server.url}/api/v1/channels") as r:
                    if (await r.json())["total"] == 2 or time.monotonic() > deadline:
                        break
                await asyncio.sleep(0.05)
            ws = await http.ws_connect(f"{server.url}/api/v1/live")
            await ws.send_json({"type": "auth", "token": token})
            await ws.send_json({"type": "subscribe", "scope": "fleet"})
            assert [c["battery_state"] for c in (await next_of(ws, "snapshot"))["channels"]] == [
                "good",
                "good",
            ]
            other = await http.ws_connect(f"{ingester.url}/api/v1/live")
            await other.send_json({"type": "auth", "token": token})
            await other.send_json({"type": "subscribe", "scope": "fleet"})
            await next_of(other, "snapshot")

            sent = time.monotonic()
            tx = Transmitter(model="ULXD2", battery_bars=1, battery_percent=8, runtime_min=10, muted=False)
            await publisher.publish(
                factory.make(
                    DeviceBody(device_key="rx1", changes={"channels": {1: {"transmitter": tx.model_dump()}}})
                )
            )
            seen: dict[str, dict[str, Any]] = {}
            while not {"channel", "alert"} <= seen.keys():  # the alert may come first
                message = await next_message(ws, timeout_s=10)
                seen.setdefault(message["type"], message.get("item", {}))
            assert time.monotonic() - sent < 2
            item, opened = seen["channel"], seen["alert"]
            assert (item["index"], item["battery_state"], item["tx"]["battery_percent"]) == (1, "critical", 8)
            assert opened["state"] == "open" and opened["rule"].startswith("battery")

            # The serving process acknowledges: the ingesting one's client hears of it.
            async with http.post(f"{server.url}/api/v1/alerts/{opened['id']}/acknowledge") as r:
                assert r.status == 200, await r.text()
            while True:
                alert = (await next_of(other, "alert", timeout_s=10))["item"]
                if alert["id"] == opened["id"] and alert["state"] == "acknowledged":
                    break
            # Unplugged, then forgotten through the serving process: the other's client drops it.
            await publisher.publish(factory.make(OfflineBody(device_key="rx1")))
            device_id = item["device_id"]
            deadline = time.monotonic() + 10
            while True:
                async with http.delete(f"{server.url}/api/v1/devices/{device_id}") as r:
                    if r.status == 204:
                        break
                    assert r.status == 409 and time.monotonic() < deadline, await r.text()
                await asyncio.sleep(0.05)
            removed = (await next_of(other, "device_removed", timeout_s=10))["item"]
            expected = {"site": "venue-s", "agent": "pi-s", "device_key": "rx1", "device_id": device_id}
            assert removed == expected
            async with http.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
            assert "micboard_live_bridge_peers 1.0" in metrics
            assert "micboard_ingest_events" not in metrics  # this process ingests nothing
            await ws.close()
            await other.close()
    finally:
        await nc.close()
        await serving.stop()
        await ingesting.stop()
