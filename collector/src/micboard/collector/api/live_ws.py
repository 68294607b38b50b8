"""The live WebSocket ``/api/v1/live``: a snapshot on subscribe, then deltas, alerts and meters.

Sources: the ingest path reports committed events (:meth:`LiveFeed.on_committed`) to the
:class:`LiveHub`, alerts reach the hub from the AlertService, and meters come straight from core
NATS on the feed's one subscription: every process shows every meter, and hands each, decoded
once, to its ``meter_listeners`` (an ingesting process's alert rules, see
:class:`~micboard.collector.services.meters.MeterService`, which records history from a share of
its own). The feed reads the changed channels from the store once per flush (however many events
changed them: a channel changed twice between flushes is sent once, as it is now), serializes
each message once, and hands the same bytes to the clients whose subscription wants it; clients
are indexed by scope, so a delta costs only its interested clients.

Frames: a client's writer sends everything queued for it at one wake-up as ONE WebSocket frame,
``{"type": "batch", "items": [message, ...]}``, whose items are the messages unchanged and in
order; the frame is joined from their serialized bytes, never serialized again per client. A
single queued message goes out as itself, and a snapshot always as its own frame. A frame holds at
most ``_BATCH_MAX_ITEMS`` messages and about ``_BATCH_MAX_BYTES`` (one message bigger than that
goes alone); more waiting goes out in further frames at once.

Guarantees (bound, policy, counter):
- Each client has a send queue of ``live_queue_messages`` sends (not frames): a snapshot, an
  alert, a meters tick, or all the channel and site messages of one flush (a flush after an
  ingest batch of hundreds of devices is one burst, not hundreds of sends). Fan-out never waits
  for a client: a client whose queue is full is dropped (close 1013) and counted in
  ``stats.slow_dropped``; it gets a fresh snapshot when it reconnects.
- Meters: one ``meters`` message per client per tick (``live_meter_hz`` ticks per second), with
  the latest reading of each channel in its scope that changed since the last tick.
- A snapshot and the deltas after it are ordered: snapshots are built and clients join the
  fan-out under the lock the deltas are computed under, so a client never receives a delta older
  than its snapshot; the writer keeps the queue's order, within a batch and across frames, and
  never puts a snapshot into a batch. Clients waiting to subscribe to one scope share one
  snapshot, read, serialized and joined at once (counted in ``stats.snapshots_shared``); a later
  subscriber gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from micboard.collector.api.auth import TOKEN_CACHE_S, Authenticator, Principal
from micboard.collector.api.errors import ApiError
from micboard.collector.api.models import AlertItem
from micboard.collector.live import LiveHub, LiveMessage, Topic
from micboard.collector.runtime import cancel_all
from micboard.collector.services.fleet import FleetView, PageRequest
from micboard.collector.services.groups import GroupStore
from micboard.collector.services.meters import METER_SUBJECTS, decode_meter
from micboard.collector.services.sync import DeviceChange, DeviceRef
from micboard.shared.envelope import AnyEvent, DeviceEvent, MeterEvent, OfflineEvent

if TYPE_CHECKING:
    from micboard.collector.ingest import CommittedBatch

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
CLOSE_AUTH_FAILED = 4401
CLOSE_RATE_LIMITED = 4429
CLOSE_SLOW = int(WSCloseCode.TRY_AGAIN_LATER)  # 1013
SITE_REFRESH_S = 5.0
#: Every subscribed client hears from the server at least this often (a ``keepalive`` when
#: nothing else happened), so that a client can tell a quiet fleet from a dead link.
KEEPALIVE_S = 10.0
_HUB_QUEUE = 65_536
_MAX_CLIENT_MESSAGE = 4096
_SNAPSHOT_SITES = 100_000
#: Bounds of one ``batch`` frame: what is queued beyond them goes out in the next frame.
_BATCH_MAX_ITEMS = 2_000
_BATCH_MAX_BYTES = 1 << 20
_BATCH_HEAD = b'{"type":"batch","items":['
_BATCH_TAIL = b"]}"

MeterListener = Callable[[MeterEvent], None]
ChannelKey = tuple[int, int]


@dataclass(slots=True)
class LiveStats:
    """Counters of the live feed, exported as metrics."""

    clients: int = 0
    connections: int = 0
    slow_dropped: int = 0
    auth_failed: int = 0
    revoked: int = 0  # connections closed because their token was revoked
    messages: int = 0
    snapshots: int = 0
    snapshots_shared: int = 0
    resyncs: int = 0
    meters_received: int = 0
    meters_bad: int = 0
    meters_sent: int = 0
    frames: int = 0


@dataclass(slots=True)
class _Scope:
    kind: str  # "fleet" | "site" | "group"
    site: str | None = None
    pairs: frozenset[ChannelKey] | None = None
    sites: frozenset[str] = frozenset()
    # False: the fleet's sites only (a view of site cards), without its every channel.
    channels: bool = True

    @property
    def key(self) -> Hashable:
        """What makes two subscriptions see the same thing (and so share a snapshot)."""
        return (self.kind, self.site, self.pairs, self.channels)

    def wants_channel(self, site: str, key: ChannelKey) -> bool:
        if self.kind == "fleet":
            return self.channels
        if self.kind == "site":
            return site == self.site
        return self.pairs is not None and key in self.pairs

    def wants_site(self, site: str) -> bool:
        if self.kind == "fleet":
            return True
        if self.kind == "site":
            return site == self.site
        return site in self.sites


def publish_committed(
    hub: LiveHub,
    events: Sequence[AnyEvent],
    restored: Iterable[DeviceRef] = (),
    devices: Iterable[DeviceChange] = (),
) -> None:
    """Tell ``hub`` which devices committed ``events`` changed; ingest calls this after each commit.

    ``restored`` are devices whose shown status changed without an event of theirs (their
    agent went stale or came back). ``devices`` are the batch's state changes: a device whose
    status and channel count they leave as they were changes nothing its site's summary counts.
    """
    by_key = {(change.agent, change.device_key): change for change in devices}
    for event in events:
        if isinstance(event, (DeviceEvent, OfflineEvent)):  # a tuple tests faster than a union, per event
            data: dict[str, Any] = {"kind": event.kind, "seq": event.seq}
            changes = event.body.changes if isinstance(event, DeviceEvent) else None
            if changes is not None and len(changes) == 1 and "channels" in changes:
                # A delta of channel fields only changes those channels' items: the live feed
                # reads just them (most deltas are one channel's battery or RF).
                data["channels"] = [int(index) for index in changes["channels"]]
                change = by_key.get((event.agent, event.body.device_key))
                if change is not None:
                    # The state the batch committed: the feed builds the items from it.
                    data["change"] = change
                    if _summary_unchanged(change):
                        data["summary"] = False
            elif isinstance(event, DeviceEvent):
                change = by_key.get((event.agent, event.body.device_key))
                gone = _channels_gone(change) if change is not None else []
                if gone:
                    # A snapshot with fewer channels (a receiver reconfigured or replaced): the
                    # store no longer has them, and views must not keep showing them.
                    data["gone"] = gone
            hub.publish_device(event.site, event.agent, event.body.device_key, data)
    for ref in restored:
        hub.publish_device(ref.site, ref.agent, ref.device_key, {"kind": "status"})


def _channels_gone(change: DeviceChange) -> list[int]:
    """The indexes of the channels ``change`` took away from its device, in order."""
    if change.before is None:
        return []
    after = {channel.get("index") for channel in change.after.get("channels") or ()}
    return sorted(
        index
        for channel in change.before.get("channels") or ()
        if type(index := channel.get("index")) is int and index not in after
    )


def _summary_unchanged(change: DeviceChange) -> bool:
    # A site's summary counts devices by status and their channels; nothing else of a device.
    before = change.before
    return (
        before is not None
        and change.status_before == change.status_after
        and len(before.get("channels") or ()) == len(change.after.get("channels") or ())
    )


def publish_batch(hub: LiveHub, batch: CommittedBatch) -> None:
    """:func:`publish_committed` of what one committed ingest transaction changed."""
    publish_committed(hub, batch.events, batch.restored, batch.devices)


def _shown(item: dict[str, Any], moving: str) -> dict[str, Any]:
    # ``moving`` changes without anything shown changing (a channel's updated_ms is its device's;
    # a site's last_seen_ms follows heartbeats): comparing without it sends only real news.
    # A shallow copy: items are built fresh for each flush and never changed once sent.
    shown = dict(item)
    shown.pop(moving, None)
    return shown


def _message(kind: str, item: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": kind, "item": item})


def _meters_message(parts: Sequence[bytes]) -> bytes:
    # The readings are serialized once each; a client's message only joins the ones it wants.
    return b'{"type":"meters","items":[' + b",".join(parts) + b"]}"


@dataclass(eq=False, slots=True)
class _Client:
    ws: web.WebSocketResponse
    limit: int
    # The API token it authenticated with: a revoked token's connections are closed.
    token_id: int | None = None
    scope: _Scope | None = None
    # Whether live levels are wanted: a view that shows none (the fleet's site cards) says no.
    meters: bool = True
    slow: bool = False
    gone: bool = False
    # Each queued send: its messages, and whether it must go out as a frame of its own.
    pending: deque[tuple[list[bytes], bool]] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, frames: list[bytes], *, alone: bool = False) -> bool:
        """Queue one send of ``frames`` without waiting; on a full queue mark the client slow.

        ``alone``: each of ``frames`` goes out as a frame of its own, never inside a batch (a
        snapshot: big, and what a client resynchronizes on).
        """
        if self.slow:
            return False
        if len(self.pending) >= self.limit:
            self.slow = True
            # What was queued is stale anyway: the client resynchronizes with a snapshot when it
            # reconnects. The writer sees ``slow`` and closes with 1013.
            self.pending.clear()
            self.ready.set()
            return False
        self.pending.append((frames, alone))
        self.ready.set()
        return True

    def take(self) -> bytes:
        """The next frame to send from the queue (not empty).

        Everything queued, in order, up to a batch's bounds: one message as itself, several as
        one ``batch`` joined from their bytes; a message queued ``alone`` as a frame of its own.
        """
        items: list[bytes] = []
        size = len(_BATCH_HEAD) + len(_BATCH_TAIL)
        pending = self.pending
        while pending:
            frames, alone = pending[0]
            if alone:
                if items:
                    break
                if len(frames) > 1:
                    pending[0] = (frames[1:], True)
                else:
                    pending.popleft()
                return frames[0]
            taken = 0
            for frame in frames:
                if items and (len(items) >= _BATCH_MAX_ITEMS or size + len(frame) + 1 > _BATCH_MAX_BYTES):
                    break
                items.append(frame)
                size += len(frame) + 1
                taken += 1
            if taken < len(frames):
                # Full: the rest of this send starts the next frame.
                pending[0] = (frames[taken:], False)
                break
            pending.popleft()
        if len(items) == 1:
            return items[0]
        return _BATCH_HEAD + b",".join(items) + _BATCH_TAIL


@dataclass(slots=True)
class _Pending:
    # Devices whose every channel may have changed (read from the store), channels of devices
    # whose committed state is at hand (built from it), and single channels to read.
    devices: set[tuple[str, str]] = field(default_factory=set)
    committed: dict[tuple[str, str], tuple[DeviceChange, set[int]]] = field(default_factory=dict)
    channels: set[tuple[str, str, int]] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)
    # Devices forgotten (deleted) since the last flush, by key, with the site they were in.
    removed: dict[tuple[str, str], str] = field(default_factory=dict)
    # Channels a snapshot took away, by device key: their site and indexes.
    gone: dict[tuple[str, str], tuple[str, set[int]]] = field(default_factory=dict)

    def device_removed(self, key: tuple[str, str], site: str) -> None:
        """Note a device deleted from the store: what was noted of it before is void."""
        self.devices.discard(key)
        self.committed.pop(key, None)
        self.channels = {c for c in self.channels if (c[0], c[1]) != key}
        self.gone.pop(key, None)
        self.removed[key] = site

    def channels_gone(self, key: tuple[str, str], site: str, indexes: list[int]) -> None:
        """Note channels a snapshot took away; the device is read whole, which decides."""
        self.devices.add(key)
        self.committed.pop(key, None)
        noted = self.gone.setdefault(key, (site, set()))[1]
        noted.update(indexes)

    def device_changed(self, key: tuple[str, str], indexes: object, change: object = None) -> None:
        """Note a device change; ``indexes`` lists the only channels it touched, if known, and
        ``change`` is the state it committed, if at hand."""
        if key in self.devices:
            return
        if not (isinstance(indexes, list) and all(type(i) is int for i in indexes)):
            self.devices.add(key)
            self.committed.pop(key, None)
            return
        if isinstance(change, DeviceChange):
            # Messages come in commit order: the later state holds every earlier change too.
            earlier = self.committed.get(key)
            touched = set(indexes) if earlier is None else earlier[1] | set(indexes)
            self.committed[key] = (change, touched)
        else:
            self.channels.update((key[0], key[1], i) for i in indexes)

    def keys(self) -> set[tuple[str, str]]:
        """Every device with a change noted."""
        return self.devices | self.committed.keys() | {(a, k) for a, k, _i in self.channels}

    def channel_keys(self) -> set[tuple[str, str, int]]:
        """The single channels to read that a whole-device read does not already cover."""
        return {c for c in self.channels if (c[0], c[1]) not in self.devices}


@dataclass(frozen=True, slots=True)
class _Snapshot:
    data: bytes
    sites: frozenset[str]


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
        # Subscribed clients, indexed by what they want: a message only visits its audience.
        self._fleet_clients: set[_Client] = set()
        self._site_clients: dict[str, set[_Client]] = {}
        self._group_clients: set[_Client] = set()
        # Every open socket, subscribed or not, so that close() can end each handler: the HTTP
        # runner waits for running handlers at shutdown.
        self._sockets: set[web.WebSocketResponse] = set()
        # Every authenticated client, subscribed or not, for closing those of a revoked token.
        self._authenticated: set[_Client] = set()
        self._lock = asyncio.Lock()
        self._pending = _Pending()
        self._wake = asyncio.Event()
        # What the subscribed clients were last shown, to send only what changed.
        self._channel_cache: dict[ChannelKey, dict[str, Any]] = {}
        self._site_cache: dict[str, dict[str, Any]] = {}
        # Site summaries handed to _send_site so far, and the number of the last one for each
        # site: the periodic refresh, which reads outside the lock, must not show an older one.
        self._site_shows = 0
        self._site_shown_at: dict[str, int] = {}
        # Clients waiting for a snapshot, by scope: whoever gets the lock serves them all at once.
        self._joining: dict[Hashable, list[_Client]] = {}
        self._keys: dict[tuple[str, str], tuple[int, str]] = {}
        self._meters: dict[ChannelKey, tuple[str, bytes]] = {}
        # While a flush runs: what each client gets from it, queued as one send at its end.
        self._burst: dict[_Client, list[bytes]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._hub_sub = hub.subscribe(max_queue=_HUB_QUEUE, topics=frozenset({Topic.DEVICE, Topic.ALERT}))
        self._hub_dropped = 0
        self._nats_sub: NatsSubscription | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the device map, subscribe to meters and start the feed's tasks."""
        self._keys = await self.fleet.device_keys()
        if self.nc is not None:
            self._nats_sub = await self.nc.subscribe(METER_SUBJECTS, cb=self._on_meter)
        self._tasks = [
            asyncio.create_task(self._pump(), name="live-pump"),
            asyncio.create_task(self._flush_loop(), name="live-flush"),
            asyncio.create_task(self._meter_loop(), name="live-meters"),
            asyncio.create_task(self._site_loop(), name="live-sites"),
            asyncio.create_task(self._keepalive_loop(), name="live-keepalive"),
            asyncio.create_task(self._token_loop(), name="live-tokens"),
        ]
        self.auth.tokens.on_revoke.append(self.revoked)

    async def close(self) -> None:
        """Stop the tasks, unsubscribe and close every client (going away)."""
        if self._nats_sub is not None:
            with contextlib.suppress(Exception):
                await self._nats_sub.unsubscribe()
            self._nats_sub = None
        self._hub_sub.close()
        with contextlib.suppress(ValueError):
            self.auth.tokens.on_revoke.remove(self.revoked)
        await cancel_all(self._tasks)
        self._tasks = []
        await asyncio.gather(*(_close_going_away(ws) for ws in list(self._sockets)))

    # -- clients by scope -----------------------------------------------------------------------

    @property
    def _subscribed(self) -> int:
        return (
            len(self._fleet_clients)
            + sum(len(clients) for clients in self._site_clients.values())
            + len(self._group_clients)
        )

    def _join(self, client: _Client, scope: _Scope) -> None:
        client.scope = scope
        if scope.kind == "fleet":
            self._fleet_clients.add(client)
        elif scope.kind == "site":
            self._site_clients.setdefault(scope.site or "", set()).add(client)
        else:
            self._group_clients.add(client)
        self.stats.clients = self._subscribed

    def _leave(self, client: _Client) -> bool:
        """Take ``client`` out of the fan-out; returns whether it was in."""
        scope = client.scope
        if scope is None:
            return False
        client.scope = None
        if scope.kind == "fleet":
            found = client in self._fleet_clients
            self._fleet_clients.discard(client)
        elif scope.kind == "site":
            clients = self._site_clients.get(scope.site or "", set())
            found = client in clients
            clients.discard(client)
            if not clients:
                self._site_clients.pop(scope.site or "", None)
        else:
            found = client in self._group_clients
            self._group_clients.discard(client)
        self.stats.clients = self._subscribed
        return found

    def _deliver(self, data: bytes, clients: Iterable[_Client]) -> None:
        if self._burst is not None:
            for client in clients:
                self._burst.setdefault(client, []).append(data)
            return
        for client in clients:
            self._offer(client, [data])

    def _offer(self, client: _Client, frames: list[bytes]) -> None:
        if client.offer(frames):
            self.stats.messages += len(frames)
        elif client.slow:
            self._drop(client)

    @contextlib.contextmanager
    def _bursting(self) -> Iterator[None]:
        """Collect what is delivered meanwhile into one send per client (a flush's changes)."""
        self._burst = {}
        try:
            yield
        finally:
            burst, self._burst = self._burst, None
            for client, frames in burst.items():
                if client.scope is not None:
                    self._offer(client, frames)

    def _drop(self, client: _Client) -> None:
        if self._leave(client):
            self.stats.slow_dropped += 1
            log.info("live client too slow, dropped", extra={"queue": self.queue_messages})

    # -- sources --------------------------------------------------------------------------------

    def on_committed(self, batch: CommittedBatch) -> None:
        """Ingest's after-commit hook: tell the hub which devices changed (never blocks)."""
        publish_batch(self.hub, batch)

    def _on_device(self, message: LiveMessage) -> None:
        agent, device_key = message.data.get("agent"), message.data.get("device_key")
        if isinstance(agent, str) and isinstance(device_key, str):
            data = message.data
            if data.get("kind") == "removed":
                self._pending.device_removed((agent, device_key), message.site)
                self._pending.sites.add(message.site)
                self._wake.set()
                return
            self._pending.device_changed((agent, device_key), data.get("channels"), data.get("change"))
            gone = data.get("gone")
            if isinstance(gone, list) and gone and all(type(i) is int for i in gone):
                self._pending.channels_gone((agent, device_key), message.site, gone)
            if data.get("summary") is not False:
                # Its site's counts may have moved (the periodic site refresh catches the rest).
                self._pending.sites.add(message.site)
            self._wake.set()

    def _on_alert(self, message: LiveMessage) -> None:
        raw = message.data.get("alert", message.data)
        try:
            # Without the listing's labels: looking them up would cost a read per alert here.
            item = AlertItem.model_validate(raw).model_dump(
                mode="json", exclude={"device_name", "channel_name"}
            )
        except ValidationError:
            log.warning("alert message not understood", extra={"site": message.site})
            return
        self._deliver(_message("alert", item), self._audience(message.site))
        self._pending.sites.add(message.site)
        self._wake.set()

    def _on_message(self, message: LiveMessage) -> None:
        if message.topic is Topic.DEVICE:
            self._on_device(message)
        elif message.topic is Topic.ALERT:
            self._on_alert(message)

    async def _pump(self) -> None:
        while True:
            message = await self._hub_sub.get()
            if message is None:
                return
            self._on_message(message)

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
        async with self._lock:
            # Taken under the lock: what changed while a snapshot was being built waits for this
            # flush, and reading it after the snapshot's read is what keeps them ordered.
            # Whatever was committed before now is noted first: a snapshot read just before this
            # flush must not be followed by a change older than what it showed.
            for message in self._hub_sub.drain():
                self._on_message(message)
            pending, self._pending = self._pending, _Pending()
            if self._hub_sub.dropped != self._hub_dropped:
                # The hub dropped changes: deltas cannot be trusted, so everyone gets a snapshot.
                self._hub_dropped = self._hub_sub.dropped
                await self._resync_all()
                return
            if not self._subscribed:
                # Nobody to tell; forget the caches so that the next subscriber starts clean.
                self._channel_cache.clear()
                self._site_cache.clear()
                for key in pending.removed:
                    self._keys.pop(key, None)
                await self._learn_keys(pending.keys())
                return
            with self._bursting():
                # Removals first: a device reported again after being forgotten follows them.
                for key, site in pending.removed.items():
                    self._send_removed(key, site)
                changed = pending.keys()
                items: list[dict[str, Any]] = []
                if pending.devices:
                    items += await self.fleet.channels_where(device_keys=pending.devices)
                single = pending.channel_keys()
                if pending.committed:
                    await self.fleet.fresh_bands()  # as a read would: a site's thresholds may have moved
                for key, (change, indexes) in pending.committed.items():
                    if key in pending.devices:
                        continue  # read whole from the store above
                    built, unread = self.fleet.committed_channel_items(change, indexes)
                    items += built
                    single.update((key[0], key[1], index) for index in unread)
                if single:
                    items += await self.fleet.channels_where(channel_keys=single)
                for item in items:
                    self._keys[(item["agent"], item["device_key"])] = (item["device_id"], item["site"])
                if changed:
                    await self._learn_keys(changed - {(i["agent"], i["device_key"]) for i in items})
                if pending.gone:
                    # Before the channels read: a tile goes before its device's others are redrawn.
                    self._send_gone(pending.gone, items)
                for item in items:
                    self._send_channel(item)
                if pending.sites:
                    shown = await self._send_sites(only=pending.sites)
                    if pending.removed:
                        # A site whose last agent was forgotten is gone from the store: say so.
                        listed = {str(item["site"]) for item in shown}
                        for site in set(pending.removed.values()) - listed:
                            self._send_site_removed(site)

    def _send_removed(self, key: tuple[str, str], site: str) -> None:
        known = self._keys.pop(key, None)
        device_id = known[0] if known is not None else None
        if device_id is not None:
            for cached in [k for k in self._channel_cache if k[0] == device_id]:
                del self._channel_cache[cached]
        audience = self._audience(site)
        if audience:
            item = {"site": site, "agent": key[0], "device_key": key[1], "device_id": device_id}
            self._deliver(_message("device_removed", item), audience)

    def _send_gone(
        self, gone: dict[tuple[str, str], tuple[str, set[int]]], items: list[dict[str, Any]]
    ) -> None:
        # The store, read after the snapshot's commit, is the truth: a channel a later snapshot
        # of the same flush brought back is in ``items`` and is not removed.
        present = {(i["agent"], i["device_key"], i["index"]) for i in items}
        for key, (site, indexes) in gone.items():
            known = self._keys.get(key)
            if known is None:
                continue  # the device itself is gone: a device_removed message says so
            device_id = known[0]
            for index in sorted(indexes):
                if (key[0], key[1], index) in present:
                    continue
                self._channel_cache.pop((device_id, index), None)
                audience = self._audience(site, (device_id, index))
                if audience:
                    item = {
                        "site": site,
                        "agent": key[0],
                        "device_key": key[1],
                        "device_id": device_id,
                        "index": index,
                    }
                    self._deliver(_message("channel_removed", item), audience)

    async def _learn_keys(self, keys: set[tuple[str, str]]) -> None:
        if keys:
            self._keys.update(await self.fleet.device_keys(keys))

    def _send_channel(self, item: dict[str, Any]) -> None:
        key = (int(item["device_id"]), int(item["index"]))
        shown = _shown(item, "updated_ms")
        if self._channel_cache.get(key) == shown:
            return
        self._channel_cache[key] = shown
        audience = self._audience(str(item["site"]), key)
        if audience:
            self._deliver(_message("channel", item), audience)

    def _audience(self, site: str, channel: ChannelKey | None = None) -> list[_Client]:
        """The clients that want a message about ``site`` (about its ``channel``, if given)."""
        fleet: Iterable[_Client] = self._fleet_clients
        if channel is not None:
            fleet = [c for c in self._fleet_clients if c.scope is None or c.scope.channels]
        audience = [*fleet, *self._site_clients.get(site, ())]
        for client in self._group_clients:
            scope = client.scope
            if scope is None:
                continue
            if scope.wants_channel(site, channel) if channel is not None else scope.wants_site(site):
                audience.append(client)
        return audience

    def _send_site(self, item: dict[str, Any]) -> None:
        site = str(item["site"])
        self._site_shows += 1
        self._site_shown_at[site] = self._site_shows
        shown = _shown(item, "last_seen_ms")
        if self._site_cache.get(site) == shown:
            return
        self._site_cache[site] = shown
        audience = self._audience(site)
        if audience:
            self._deliver(_message("site", item), audience)

    def _send_site_removed(self, site: str) -> None:
        self._site_cache.pop(site, None)
        self._site_shown_at.pop(site, None)
        audience = self._audience(site)
        if audience:
            self._deliver(_message("site_removed", {"site": site}), audience)

    async def _send_sites(self, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
        listing = await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0), only=only)
        for item in listing.items:
            self._send_site(item)
        return listing.items

    async def refresh_site(self, site: str) -> None:
        """Read ``site``'s channels again and send those whose item changed (its thresholds moved)."""
        async with self._lock:
            if not self._subscribed:
                return
            items = await self.fleet.channels_where(site=site)
            with self._bursting():
                for item in items:
                    self._send_channel(item)

    @property
    def open_connections(self) -> int:
        """Open WebSocket connections, whether authenticated and subscribed or not."""
        return len(self._sockets)

    def revoked(self, token_id: int) -> None:
        """Close, now, every connection that authenticated with ``token_id`` (revoked here)."""
        for client in [c for c in self._authenticated if c.token_id == token_id]:
            self._end_revoked(client)

    def _end_revoked(self, client: _Client) -> None:
        self._authenticated.discard(client)
        self.stats.revoked += 1
        log.info("live connection closed: its token was revoked", extra={"token_id": client.token_id})
        # The close frame ends the client's receive loop, which cleans up as for any close.
        self._tasks.append(asyncio.create_task(_close_revoked(client.ws), name="live-revoked-close"))

    async def _token_loop(self) -> None:
        # A token revoked by another collector or the CLI: found within the API's own token
        # cache time, as a REST call with it would be refused.
        while True:
            await asyncio.sleep(TOKEN_CACHE_S)
            ids = {c.token_id for c in self._authenticated if c.token_id is not None}
            if not ids:
                continue
            try:
                gone = await self.auth.tokens.gone(ids)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("live token check failed; retrying", extra={"error": str(exc)})
                continue
            for client in [c for c in self._authenticated if c.token_id in gone]:
                self._end_revoked(client)
            self._tasks = [t for t in self._tasks if not t.done()]

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            self._send_keepalive()

    def _send_keepalive(self) -> None:
        clients = [
            *self._fleet_clients,
            *(client for clients in self._site_clients.values() for client in clients),
            *self._group_clients,
        ]
        if clients:
            # Sent to everyone, busy or not: cheaper than tracking who heard what when.
            self._deliver(orjson.dumps({"type": "keepalive", "ts_ms": int(time.time() * 1000)}), clients)

    async def _site_loop(self) -> None:
        # Stale devices and agents change without an event (a sweep marks them); refresh sites
        # now and then so that the fleet view follows.
        # Half a period out of step with the collector's other periodic jobs (the alert sweep
        # every 5 s from start): started together, they all landed on the event loop at once.
        await asyncio.sleep(SITE_REFRESH_S / 2)
        while True:
            await asyncio.sleep(SITE_REFRESH_S)
            if not self._subscribed:
                continue
            try:
                # Read outside the lock: a flush waiting for it would hold every change committed
                # meanwhile for the length of the read (tens of milliseconds for a large fleet).
                mark = self._site_shows
                listing = await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0))
                async with self._lock:
                    with self._bursting():
                        for item in listing.items:
                            # A site shown since this read began may have been read after it:
                            # what this read found could be older than what clients now see.
                            if self._site_shown_at.get(str(item["site"]), 0) <= mark:
                                self._send_site(item)
                        if len(listing.items) < _SNAPSHOT_SITES:
                            # Shown before this read and not in it: gone (its last agent was
                            # forgotten), however the change that removed it was told.
                            listed = {str(item["site"]) for item in listing.items}
                            for site in [
                                s
                                for s in self._site_cache
                                if s not in listed and self._site_shown_at.get(s, 0) <= mark
                            ]:
                                self._send_site_removed(site)
                # A site's thresholds changed by another collector process or the CLI: its
                # tiles follow within one refresh (this process's own changes go at once).
                await self.fleet.fresh_bands(now=True)
                for site in sorted(self.fleet.take_moved_bands()):
                    await self.refresh_site(site)
            except Exception:
                log.exception("live site refresh failed")

    # -- meters ---------------------------------------------------------------------------------

    async def _on_meter(self, msg: Msg) -> None:
        self.stats.meters_received += 1
        if not self._subscribed and not self.meter_listeners:
            return  # nobody watches and nothing evaluates: not worth decoding
        event = decode_meter(msg.subject, msg.data)
        if event is None:
            self.stats.meters_bad += 1
            return
        for listener in self.meter_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("meter listener failed")
        if not self._subscribed:
            return
        known = self._keys.get((event.agent, event.body.device_key))
        if known is None:
            # Not stored yet (its snapshot may still be in flight): nothing to show it on.
            self.stats.meters_bad += 1
            return
        device_id, site = known
        for meter in event.body.channels:
            # Serialized as it arrives: a reading is sent at most once per tick whoever wants it.
            self._meters[(device_id, meter.index)] = (
                site,
                orjson.dumps(
                    {
                        "device_id": device_id,
                        "index": meter.index,
                        "rf_dbm": list(meter.rf_dbm),
                        "active_antenna": meter.active_antenna.value if meter.active_antenna else None,
                        "antenna_states": [state.value for state in meter.antenna_states],
                        "audio_dbfs": meter.audio_dbfs,
                        "audio_peak_dbfs": meter.audio_peak_dbfs,
                        "link_quality_percent": meter.link_quality_percent,
                    }
                ),
            )

    async def _meter_loop(self) -> None:
        while True:
            await asyncio.sleep(self.meter_interval_s)
            meters, self._meters = self._meters, {}
            if meters and self._subscribed:
                self._send_meters(meters)

    def _send_meters(self, meters: dict[ChannelKey, tuple[str, bytes]]) -> None:
        """One ``meters`` message per client: fleet clients share one, a site's clients another."""
        by_site: dict[str, list[bytes]] = {}
        for site, part in meters.values():
            by_site.setdefault(site, []).append(part)
        self.stats.meters_sent += len(meters)
        fleet_clients = [client for client in self._fleet_clients if client.meters]
        if fleet_clients:
            everything = [part for parts in by_site.values() for part in parts]
            self._deliver(_meters_message(everything), fleet_clients)
        for site, clients in list(self._site_clients.items()):
            parts = by_site.get(site)
            wanting = [client for client in clients if client.meters]
            if parts and wanting:
                self._deliver(_meters_message(parts), wanting)
        for client in list(self._group_clients):
            if not client.meters:
                continue
            pairs = client.scope.pairs if client.scope is not None else None
            wanted = [part for key, (_, part) in meters.items() if pairs and key in pairs]
            if wanted:
                self._deliver(_meters_message(wanted), (client,))

    # -- snapshots ------------------------------------------------------------------------------

    async def _snapshot(self, scope: _Scope) -> _Snapshot:
        """The serialized snapshot of ``scope``, read now; under the lock."""
        if scope.kind == "fleet":
            channels = await self.fleet.channels_where() if scope.channels else []
            sites = (await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0))).items
        elif scope.kind == "site":
            channels = await self.fleet.channels_where(site=scope.site)
            sites = (await self.fleet.list_sites(PageRequest(1, 0), only=[scope.site or ""])).items
        else:
            channels = await self.fleet.channels_where(pairs=scope.pairs or ())
            wanted = frozenset(str(c["site"]) for c in channels)
            sites = (await self.fleet.list_sites(PageRequest(_SNAPSHOT_SITES, 0), only=wanted)).items
        # What the snapshot read may be newer than what the subscribed clients were shown (a
        # change committed since the last flush): tell them now, so that the caches stay what
        # every client was last shown (else that flush would find the change known and drop it).
        for item in channels:
            self._keys[(item["agent"], item["device_key"])] = (item["device_id"], item["site"])
            self._send_channel(item)
        for item in sites:
            self._send_site(item)
        snapshot = _Snapshot(
            orjson.dumps({"type": "snapshot", "channels": channels, "sites": sites}),
            frozenset(str(c["site"]) for c in channels),
        )
        self.stats.snapshots += 1
        return snapshot

    async def _serve_snapshot(self, scope: _Scope, clients: Sequence[_Client]) -> None:
        """Send ``scope``'s snapshot to ``clients`` and join them to the fan-out; under the lock."""
        clients = [client for client in clients if not client.gone]
        if not clients:
            return
        with self._bursting():
            snapshot = await self._snapshot(scope)
        self.stats.snapshots_shared += len(clients) - 1
        if scope.kind == "group":
            scope.sites = snapshot.sites
        for client in clients:
            self._leave(client)
            if client.offer([snapshot.data], alone=True):
                self._join(client, scope)
            else:
                self.stats.slow_dropped += 1

    async def _resync_all(self) -> None:
        self.stats.resyncs += 1
        # The caches cannot be trusted either: start from what the store holds now.
        self._channel_cache.clear()
        self._site_cache.clear()
        by_scope: dict[Hashable, tuple[_Scope, list[_Client]]] = {}
        for client in [*self._fleet_clients, *self._group_clients]:
            if client.scope is not None:
                by_scope.setdefault(client.scope.key, (client.scope, []))[1].append(client)
        for site_clients in self._site_clients.values():
            for client in site_clients:
                if client.scope is not None:
                    by_scope.setdefault(client.scope.key, (client.scope, []))[1].append(client)
        for scope, clients in by_scope.values():
            await self._serve_snapshot(scope, clients)

    async def _subscribe(self, client: _Client, request: dict[str, Any]) -> str | None:
        """Apply a subscribe request; returns an error text, or ``None`` once the snapshot is queued."""
        kind = request.get("scope")
        meters = request.get("meters", True)
        if not isinstance(meters, bool):
            return "meters must be true or false"
        channels = request.get("channels", True)
        if not isinstance(channels, bool) or (not channels and kind != "fleet"):
            return "channels must be true or false, and false only for scope 'fleet'"
        if kind == "fleet":
            scope = _Scope("fleet", channels=channels)
        elif kind == "site" and isinstance(request.get("site"), str) and 0 < len(request["site"]) <= 64:
            scope = _Scope("site", site=request["site"])
        elif kind == "group" and type(request.get("group_id")) is int and 0 < request["group_id"] < 2**31:
            group = await self.groups.get(request["group_id"])
            if group is None:
                return f"group {request['group_id']} does not exist"
            scope = _Scope("group", pairs=frozenset((c["device_id"], c["index"]) for c in group.channels))
        else:
            return "subscribe needs scope 'fleet', 'site' with 'site', or 'group' with an integer 'group_id'"
        client.meters = meters  # once the request is known good: a refused one changes nothing
        # Wait in line with whoever else wants this scope: the first of them to get the lock
        # builds one snapshot for all. Snapshot first, then join the fan-out, both under the lock
        # deltas are computed under: nothing reaches a client before its snapshot, and no delta
        # is computed between the two.
        self._joining.setdefault(scope.key, []).append(client)
        async with self._lock:
            waiting = self._joining.pop(scope.key, None)
            if waiting is not None:
                await self._serve_snapshot(scope, waiting)
        return None

    # -- the WebSocket --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/live``: authenticate with the first message, subscribe, then receive."""
        # No per-message deflate: it compressed every frame once per client (the same bytes go to
        # many), which cost more CPU than the fan-out itself; dashboards sit on the venue LAN.
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=_MAX_CLIENT_MESSAGE, compress=False)
        await ws.prepare(request)
        self.stats.connections += 1
        self._sockets.add(ws)
        try:
            return await self._serve(request, ws)
        finally:
            self._sockets.discard(ws)

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        principal = await self._authenticate(request, ws)
        if principal is None:
            return ws
        client = _Client(ws, self.queue_messages, token_id=principal.token_id)
        self._authenticated.add(client)
        writer = asyncio.create_task(self._write(client), name="live-writer")
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    data = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
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
            client.gone = True
            self._authenticated.discard(client)
            self._leave(client)
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
        if not client.offer([orjson.dumps({"type": "error", "code": code, "detail": detail})]):
            self._drop(client)

    async def _authenticate(self, request: web.Request, ws: web.WebSocketResponse) -> Principal | None:
        try:
            msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
        except TimeoutError:
            msg = None
        token = None
        if msg is not None and msg.type is WSMsgType.TEXT:
            try:
                data = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict) and data.get("type") == "auth" and isinstance(data.get("token"), str):
                token = data["token"]
        try:
            return await self.auth.check_token(request.remote or "-", token)
        except ApiError as exc:
            self.stats.auth_failed += 1
            code = CLOSE_RATE_LIMITED if exc.status == 429 else CLOSE_AUTH_FAILED
            await ws.close(code=code, message=exc.code.encode())
            return None

    async def _write(self, client: _Client) -> None:
        # One wake-up per burst, not per message: everything queued meanwhile goes out as one
        # frame (a ``batch``; a send syscall and framing cost about 30 us, so one frame per
        # message and client was what saturated the loop at thousands of deltas a second).
        # The timeout restarts as messages are sent: a client that reads slowly but steadily
        # keeps up; one that stopped reading for the whole timeout is given up.
        # The deadline moves at most once a second: moving a timer per frame cost more than
        # sending the frame.
        ws = client.ws
        loop = asyncio.get_running_loop()
        while True:
            await client.ready.wait()
            client.ready.clear()
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S) as deadline:
                    armed = loop.time()
                    # Marked slow while sending: the rest is stale, the close comes next.
                    while client.pending and not client.slow:
                        frame = client.take()
                        # Already UTF-8 JSON: a text frame, not encoded again per client.
                        await ws.send_frame(frame, WSMsgType.TEXT)
                        self.stats.frames += 1
                        now = loop.time()
                        if now - armed >= 1.0:
                            deadline.reschedule(now + SEND_TIMEOUT_S)
                            armed = now
            except (ConnectionError, TimeoutError, RuntimeError):
                # A peer that went away or stopped reading for the whole timeout: give it up.
                client.slow = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=CLOSE_SLOW), 1)
                return
            if client.slow:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        ws.close(code=CLOSE_SLOW, message=b"slow consumer"), SEND_TIMEOUT_S
                    )
                return


async def _close_revoked(ws: web.WebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code=CLOSE_AUTH_FAILED, message=b"auth.revoked"), SEND_TIMEOUT_S)


async def _close_going_away(ws: web.WebSocketResponse) -> None:
    # Bounded: a peer that never answers the close frame must not hold the shutdown up.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown")
