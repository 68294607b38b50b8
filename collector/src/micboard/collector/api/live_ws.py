"""The live WebSocket ``/api/v1/live``: a snapshot on subscribe, then deltas, alerts and meters.

Sources: the ingest path reports committed events (:meth:`LiveFeed.on_committed`) to the
:class:`LiveHub`, alerts reach the hub from the AlertService, and meters come straight from core
NATS. The feed reads the changed channels from the store once per batch and sends each message,
serialized once, to every client whose subscription wants it.

Guarantees (bound, policy, counter):
- Each client has a send queue of ``live_queue_messages`` messages. Fan-out never waits for a
  client: a client whose queue is full is dropped (close 1013) and counted in
  ``stats.slow_dropped``; it gets a fresh snapshot when it reconnects.
- Meters: at most ``live_meter_hz`` messages per channel per second; the latest reading wins.
- A snapshot and the deltas after it are ordered: both are taken under one lock, so a client
  never receives a delta older than its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from pydantic import ValidationError

from micboard.collector.api.auth import Authenticator
from micboard.collector.api.errors import ApiError
from micboard.collector.api.models import AlertItem
from micboard.collector.live import LiveHub, LiveMessage, Topic
from micboard.collector.services.fleet import FleetView, PageRequest
from micboard.collector.services.groups import GroupStore
from micboard.collector.services.sync import DeviceRef
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceEvent, MeterEvent, OfflineEvent
from micboard.shared.errors import WireError
from micboard.shared.subjects import SUBJECT_PREFIX, Kind

if TYPE_CHECKING:
    from micboard.collector.ingest import CommittedBatch

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
CLOSE_AUTH_FAILED = 4401
CLOSE_RATE_LIMITED = 4429
CLOSE_SLOW = int(WSCloseCode.TRY_AGAIN_LATER)  # 1013
SITE_REFRESH_S = 5.0
_HUB_QUEUE = 65_536
_MAX_CLIENT_MESSAGE = 4096
_SNAPSHOT_SITES = 100_000

MeterListener = Callable[[MeterEvent], None]


@dataclass(slots=True)
class LiveStats:
    """Counters of the live feed, exported as metrics."""

    clients: int = 0
    connections: int = 0
    slow_dropped: int = 0
    auth_failed: int = 0
    messages: int = 0
    snapshots: int = 0
    resyncs: int = 0
    meters_received: int = 0
    meters_bad: int = 0
    meters_sent: int = 0


@dataclass(slots=True)
class _Scope:
    kind: str  # "fleet" | "site" | "group"
    site: str | None = None
    pairs: frozenset[tuple[int, int]] | None = None
    sites: frozenset[str] = frozenset()

    def wants_channel(self, site: str, device_id: int, index: int) -> bool:
        if self.kind == "fleet":
            return True
        if self.kind == "site":
            return site == self.site
        return self.pairs is not None and (device_id, index) in self.pairs

    def wants_site(self, site: str) -> bool:
        if self.kind == "fleet":
            return True
        if self.kind == "site":
            return site == self.site
        return site in self.sites


def publish_committed(hub: LiveHub, events: Sequence[AnyEvent], restored: Iterable[DeviceRef] = ()) -> None:
    """Tell ``hub`` which devices committed ``events`` changed; ingest calls this after each commit.

    ``restored`` are devices whose shown status changed without an event of theirs (their
    agent went stale or came back).
    """
    for event in events:
        if isinstance(event, DeviceEvent | OfflineEvent):
            hub.publish_device(
                event.site, event.agent, event.body.device_key, {"kind": event.kind, "seq": event.seq}
            )
    for ref in restored:
        hub.publish_device(ref.site, ref.agent, ref.device_key, {"kind": "status"})


def _shown_channel(item: dict[str, Any]) -> str:
    # updated_ms is the device's: it moves when any channel of the device changes, so comparing
    # without it sends only the channels that changed.
    return json.dumps({k: v for k, v in item.items() if k != "updated_ms"})


def _channel_filter(site: str, device_id: int, index: int) -> Callable[[_Scope], bool]:
    return lambda scope: scope.wants_channel(site, device_id, index)


def _site_filter(site: str) -> Callable[[_Scope], bool]:
    return lambda scope: scope.wants_site(site)


_SLOW = object()


@dataclass(eq=False, slots=True)
class _Client:
    ws: web.WebSocketResponse
    queue: asyncio.Queue[object]
    scope: _Scope | None = None
    slow: bool = False

    def offer(self, text: str) -> bool:
        """Queue ``text`` without waiting; on a full queue mark the client slow (it will be closed)."""
        if self.slow:
            return False
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.slow = True
            # Make room for the one message that tells the writer to close: what was queued is
            # stale anyway, and the client resynchronizes with a snapshot when it reconnects.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_SLOW)
            return False
        return True


@dataclass(slots=True)
class _Pending:
    devices: set[tuple[str, str]] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)


class LiveFeed:
    """Owns the live clients, the hub subscription and the meter subscription."""

    def __init__(
        self,
        fleet: FleetView,
        groups: GroupStore,
        hub: LiveHub,
        auth: Authenticator,
        *,
        queue_messages: int = 512,
        meter_hz: float = 10.0,
        nc: Client | None = None,
        meter_listeners: Sequence[MeterListener] = (),
    ) -> None:
        self.fleet = fleet
        self.groups = groups
        self.hub = hub
        self.auth = auth
        self.queue_messages = queue_messages
        self.meter_interval_s = 1.0 / meter_hz
        self.nc = nc
        self.meter_listeners = list(meter_listeners)
        self.stats = LiveStats()
        self._clients: set[_Client] = set()
        # Every open socket, subscribed or not, so that close() can end each handler: the HTTP
        # runner waits for running handlers at shutdown.
        self._sockets: set[web.WebSocketResponse] = set()
        self._lock = asyncio.Lock()
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._channel_cache: dict[tuple[int, int], str] = {}
        self._site_cache: dict[str, str] = {}
        self._keys: dict[tuple[str, str], tuple[int, str]] = {}
        self._meters: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._hub_sub = hub.subscribe(max_queue=_HUB_QUEUE, topics=frozenset({Topic.DEVICE, Topic.ALERT}))
        self._hub_dropped = 0
        self._nats_sub: NatsSubscription | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the device map, subscribe to meters and start the feed's tasks."""
        self._keys = await self.fleet.device_keys()
        if self.nc is not None:
            self._nats_sub = await self.nc.subscribe(
                f"{SUBJECT_PREFIX}.*.*.{Kind.METER.value}", cb=self._on_meter
            )
        self._tasks = [
            asyncio.create_task(self._pump(), name="live-pump"),
            asyncio.create_task(self._flush_loop(), name="live-flush"),
            asyncio.create_task(self._meter_loop(), name="live-meters"),
            asyncio.create_task(self._site_loop(), name="live-sites"),
        ]

    async def close(self) -> None:
        """Stop the tasks, unsubscribe and close every client (going away)."""
        if self._nats_sub is not None:
            with contextlib.suppress(Exception):
                await self._nats_sub.unsubscribe()
            self._nats_sub = None
        self._hub_sub.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await asyncio.gather(*(_close_going_away(ws) for ws in list(self._sockets)))

    # -- sources --------------------------------------------------------------------------------

    def on_committed(self, batch: CommittedBatch) -> None:
        """Ingest's after-commit hook: tell the hub which devices changed (never blocks)."""
        publish_committed(self.hub, batch.events, batch.restored)

    def _on_device(self, message: LiveMessage) -> None:
        agent, device_key = message.data.get("agent"), message.data.get("device_key")
        if isinstance(agent, str) and isinstance(device_key, str):
            self._pending.devices.add((agent, device_key))
            self._pending.sites.add(message.site)
            self._wake.set()

    def _on_alert(self, message: LiveMessage) -> None:
        raw = message.data.get("alert", message.data)
        try:
            item = AlertItem.model_validate(raw).model_dump(mode="json")
        except ValidationError:
            log.warning("alert message not understood", extra={"site": message.site})
            return
        self._fan_out(json.dumps({"type": "alert", "item": item}), _site_filter(message.site))
        self._pending.sites.add(message.site)
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            message = await self._hub_sub.get()
            if message is None:
                return
            if message.topic is Topic.DEVICE:
                self._on_device(message)
            elif message.topic is Topic.ALERT:
                self._on_alert(message)

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                # The store may be briefly away; the next change or site refresh catches up.
                log.exception("live flush failed")
                await asyncio.sleep(0.5)

    async def _flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        async with self._lock:
            if self._hub_sub.dropped != self._hub_dropped:
                # The hub dropped changes: deltas cannot be trusted, so everyone gets a snapshot.
                self._hub_dropped = self._hub_sub.dropped
                await self._resync_all()
                return
            if not self._clients:
                # Nobody to tell; forget the caches so that the next subscriber starts clean.
                self._channel_cache.clear()
                self._site_cache.clear()
                await self._learn_keys(pending.devices)
                return
            if pending.devices:
                items = await self.fleet.channels_where(device_keys=pending.devices)
                for item in items:
                    self._keys[(item["agent"], item["device_key"])] = (item["device_id"], item["site"])
                    self._send_channel(item)
                await self._learn_keys(pending.devices - {(i["agent"], i["device_key"]) for i in items})
            if pending.sites:
                await self._send_sites(only=pending.sites)

    async def _learn_keys(self, keys: set[tuple[str, str]]) -> None:
        if keys:
            self._keys.update(await self.fleet.device_keys(keys))

    def _send_channel(self, item: dict[str, Any]) -> None:
        key = (int(item["device_id"]), int(item["index"]))
        shown = _shown_channel(item)
        if self._channel_cache.get(key) == shown:
            return
        self._channel_cache[key] = shown
        text = json.dumps({"type": "channel", "item": item})
        site = str(item["site"])
        self._fan_out(text, _channel_filter(site, key[0], key[1]))

    async def _send_sites(self, only: Iterable[str] | None = None) -> None:
        listing = await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0), only=only)
        for item in listing.items:
            site = str(item["site"])
            # last_seen_ms moves with every heartbeat; only a change of what a site shows is news.
            shown = json.dumps({k: v for k, v in item.items() if k != "last_seen_ms"})
            if self._site_cache.get(site) == shown:
                continue
            self._site_cache[site] = shown
            self._fan_out(json.dumps({"type": "site", "item": item}), _site_filter(site))

    async def _site_loop(self) -> None:
        # Stale devices and agents change without an event (a sweep marks them); refresh sites
        # now and then so that the fleet view follows.
        while True:
            await asyncio.sleep(SITE_REFRESH_S)
            if not self._clients:
                continue
            try:
                async with self._lock:
                    await self._send_sites()
            except Exception:
                log.exception("live site refresh failed")

    # -- meters ---------------------------------------------------------------------------------

    async def _on_meter(self, msg: Msg) -> None:
        self.stats.meters_received += 1
        try:
            event = decode(msg.data)
        except WireError:
            self.stats.meters_bad += 1
            return
        if not isinstance(event, MeterEvent) or not msg.subject.endswith(
            f".{event.site}.{event.agent}.{Kind.METER.value}"
        ):
            self.stats.meters_bad += 1
            return
        for listener in self.meter_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("meter listener failed")
        known = self._keys.get((event.agent, event.body.device_key))
        if known is None:
            # Not stored yet (its snapshot may still be in flight): nothing to show it on.
            self.stats.meters_bad += 1
            return
        device_id, site = known
        for meter in event.body.channels:
            self._meters[(device_id, meter.index)] = (
                site,
                {
                    "type": "meter",
                    "device_id": device_id,
                    "index": meter.index,
                    "rf_dbm": list(meter.rf_dbm),
                    "active_antenna": meter.active_antenna.value if meter.active_antenna else None,
                    "audio_dbfs": meter.audio_dbfs,
                    "audio_peak_dbfs": meter.audio_peak_dbfs,
                    "link_quality_percent": meter.link_quality_percent,
                },
            )

    async def _meter_loop(self) -> None:
        while True:
            await asyncio.sleep(self.meter_interval_s)
            meters, self._meters = self._meters, {}
            if not self._clients:
                continue
            for (device_id, index), (site, payload) in meters.items():
                self.stats.meters_sent += 1
                self._fan_out(
                    json.dumps(payload),
                    _channel_filter(site, device_id, index),
                )

    # -- clients --------------------------------------------------------------------------------

    def _fan_out(self, text: str, wanted: Callable[[_Scope], bool]) -> None:
        for client in list(self._clients):
            if client.scope is None or not wanted(client.scope):
                continue
            if client.offer(text):
                self.stats.messages += 1
            elif client.slow:
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self.stats.clients = len(self._clients)
            self.stats.slow_dropped += 1
            log.info("live client too slow, dropped", extra={"queue": self.queue_messages})

    async def _snapshot(self, scope: _Scope) -> str:
        if scope.kind == "fleet":
            channels = await self.fleet.channels_where()
            sites = (await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0))).items
        elif scope.kind == "site":
            channels = await self.fleet.channels_where(site=scope.site)
            sites = (await self.fleet.list_sites(PageRequest(1, 0), only=[scope.site or ""])).items
        else:
            channels = await self.fleet.channels_where(pairs=scope.pairs or ())
            scope.sites = frozenset(str(c["site"]) for c in channels)
            sites = (await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0), only=scope.sites)).items
        for item in channels:
            key = (int(item["device_id"]), int(item["index"]))
            self._channel_cache[key] = _shown_channel(item)
            self._keys[(item["agent"], item["device_key"])] = (item["device_id"], item["site"])
        for item in sites:
            self._site_cache[str(item["site"])] = json.dumps(
                {k: v for k, v in item.items() if k != "last_seen_ms"}
            )
        self.stats.snapshots += 1
        return json.dumps({"type": "snapshot", "channels": channels, "sites": sites})

    async def _resync_all(self) -> None:
        self.stats.resyncs += 1
        for client in list(self._clients):
            if client.scope is not None and not client.offer(await self._snapshot(client.scope)):
                self._drop(client)

    async def _subscribe(self, client: _Client, request: dict[str, Any]) -> str | None:
        """Apply a subscribe request; returns an error text, or ``None`` once the snapshot is queued."""
        kind = request.get("scope")
        if kind == "fleet":
            scope = _Scope("fleet")
        elif kind == "site" and isinstance(request.get("site"), str) and 0 < len(request["site"]) <= 64:
            scope = _Scope("site", site=request["site"])
        elif kind == "group" and type(request.get("group_id")) is int and 0 < request["group_id"] < 2**31:
            group = await self.groups.get(request["group_id"])
            if group is None:
                return f"group {request['group_id']} does not exist"
            scope = _Scope("group", pairs=frozenset((c["device_id"], c["index"]) for c in group.channels))
        else:
            return "subscribe needs scope 'fleet', 'site' with 'site', or 'group' with an integer 'group_id'"
        async with self._lock:
            # Snapshot first, then join the fan-out: nothing reaches the client before its snapshot,
            # and no delta is computed between the two (deltas are computed under this lock).
            snapshot = await self._snapshot(scope)
            client.scope = scope
            if client.offer(snapshot):
                self._clients.add(client)
                self.stats.clients = len(self._clients)
            else:
                self.stats.slow_dropped += 1
        return None

    # -- the WebSocket --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/live``: authenticate with the first message, subscribe, then receive."""
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=_MAX_CLIENT_MESSAGE)
        await ws.prepare(request)
        self.stats.connections += 1
        self._sockets.add(ws)
        try:
            return await self._serve(request, ws)
        finally:
            self._sockets.discard(ws)

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        if not await self._authenticate(request, ws):
            return ws
        client = _Client(ws, asyncio.Queue(maxsize=self.queue_messages))
        writer = asyncio.create_task(self._write(client), name="live-writer")
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    data = None
                if not isinstance(data, dict) or data.get("type") != "subscribe":
                    self._reply_error(
                        client, "live.invalid_message", "send {'type': 'subscribe', 'scope': ...}"
                    )
                    continue
                error = await self._subscribe(client, data)
                if error is not None:
                    self._reply_error(client, "live.invalid_subscription", error)
                if client.slow:
                    break
        finally:
            self._clients.discard(client)
            self.stats.clients = len(self._clients)
            if client.slow:
                # Let the writer deliver the close frame (1013) before giving up on the client.
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(writer), SEND_TIMEOUT_S)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)
        return ws

    def _reply_error(self, client: _Client, code: str, detail: str) -> None:
        if not client.offer(json.dumps({"type": "error", "code": code, "detail": detail})):
            self._drop(client)

    async def _authenticate(self, request: web.Request, ws: web.WebSocketResponse) -> bool:
        try:
            msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
        except TimeoutError:
            msg = None
        token = None
        if msg is not None and msg.type is WSMsgType.TEXT:
            try:
                data = json.loads(msg.data)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("type") == "auth" and isinstance(data.get("token"), str):
                token = data["token"]
        try:
            await self.auth.check_token(request.remote or "-", token)
        except ApiError as exc:
            self.stats.auth_failed += 1
            code = CLOSE_RATE_LIMITED if exc.status == 429 else CLOSE_AUTH_FAILED
            await ws.close(code=code, message=exc.code.encode())
            return False
        return True

    async def _write(self, client: _Client) -> None:
        while True:
            item = await client.queue.get()
            if item is _SLOW:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        client.ws.close(code=CLOSE_SLOW, message=b"slow consumer"), SEND_TIMEOUT_S
                    )
                return
            assert isinstance(item, str)
            try:
                await asyncio.wait_for(client.ws.send_str(item), SEND_TIMEOUT_S)
            except (ConnectionError, TimeoutError, RuntimeError):
                # A peer that went away or stopped reading for the whole timeout: give it up.
                client.slow = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.ws.close(code=CLOSE_SLOW), 1)
                return


async def _close_going_away(ws: web.WebSocketResponse) -> None:
    # Bounded: a peer that never answers the close frame must not hold the shutdown up.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown")
