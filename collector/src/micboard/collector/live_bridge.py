"""LiveBridge: what one collector process commits reaches the live views of every other one.

A :class:`~micboard.collector.live.LiveHub` is in-process: the live WebSocket of a process sees the
device changes its own ingest committed and the alerts its own services changed. Collectors that
share the durable consumer split the events between them, and a process started with
``MICBOARD_INGEST=false`` ingests nothing at all; without a bridge their dashboards would miss
what the others applied.

The bridge forwards every device and alert message published on the local hub to core NATS, on
``micboard.live.v1.<origin>`` (``origin``: a random token per process), and publishes what the
other processes forward on its own hub. Its own messages come back from the server and are
skipped by subject, without being decoded.

A bridge forwards only while it has heard from another collector process: each announces itself
every ``ANNOUNCE_S`` (an empty payload), and one that heard no other within three such intervals
sends nothing, so a single collector pays nothing for the bridge. A process announces itself when it
starts, before it serves anything, so the others forward to it from then on; each answers a new
peer's announcement with its own, so the newcomer forwards to them at once too.

What crosses: the message's topic, site and data, except a device message's ``change`` (the
committed state, a Python object): the receiving feed reads the changed channels from the store,
which the sender committed before forwarding. Meters do not cross: every process receives them
from the agents directly.

Wire: one msgpack map ``{"v": 1, "m": [[topic, site, data], ...]}`` per loop iteration of the
sender (an ingest batch's messages travel together), at most ``_CHUNK_MESSAGES`` messages each.
A payload that does not decode or whose messages do not have that shape is counted
(``stats.bad``), logged, and dropped; it never stops the bridge. A failed publish is counted
(``stats.failed``) and logged: the live views it was for catch up with the next change of each
device, or a snapshot when their client reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from micboard.collector.live import LiveHub, LiveMessage, Topic
from micboard.collector.runtime import cancel_all

log = logging.getLogger(__name__)

#: Subjects of the bridge; collectors publish on ``<prefix>.<origin>`` and subscribe to ``<prefix>.*``.
LIVE_SUBJECT_PREFIX = "micboard.live.v1"
WIRE_VERSION = 1
_CHUNK_MESSAGES = 1000
#: How often a bridge announces itself; a peer silent for three intervals is gone.
ANNOUNCE_S = 5.0
#: How long start() waits for its own announcement to come back (the proof it is subscribed).
SUBSCRIBE_WAIT_S = 5.0
_TOPICS = {Topic.DEVICE.value: Topic.DEVICE, Topic.ALERT.value: Topic.ALERT}
# A bad payload is logged the first time and then every this many, so that a flood stays readable.
_LOG_EVERY = 1000


@dataclass(slots=True)
class BridgeStats:
    """Counters of the bridge, exported as metrics."""

    sent: int = 0
    payloads_sent: int = 0
    received: int = 0
    bad: int = 0
    failed: int = 0


class BridgeError(ValueError):
    """A bridge payload that does not have the documented shape."""


def encode_messages(messages: list[LiveMessage]) -> bytes:
    """One bridge payload of ``messages`` (a device message's ``change`` left out)."""
    items = []
    for message in messages:
        data = message.data
        if message.topic is Topic.DEVICE and "change" in data:
            data = {key: value for key, value in data.items() if key != "change"}
        items.append([message.topic.value, message.site, data])
    payload: bytes = msgpack.packb({"v": WIRE_VERSION, "m": items})
    return payload


def decode_messages(payload: bytes) -> list[LiveMessage]:
    """The messages of one bridge payload; raises :class:`BridgeError` on anything else."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        # What msgpack raises on garbage (ExtraData, FormatError and StackError are ValueErrors).
        raise BridgeError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION or not isinstance(body.get("m"), list):
        raise BridgeError(f"not a version {WIRE_VERSION} bridge payload")
    messages = []
    for item in body["m"]:
        if not (isinstance(item, list) and len(item) == 3):
            raise BridgeError("a message is not [topic, site, data]")
        topic, site, data = item
        # The str test first: a list or a map from msgpack is unhashable, and `in` would raise.
        if (
            not isinstance(topic, str)
            or topic not in _TOPICS
            or not isinstance(site, str)
            or not isinstance(data, dict)
        ):
            raise BridgeError(f"a message has a bad topic, site or data: {str(item)[:120]}")
        if topic == Topic.DEVICE.value and not _device_data_ok(data):
            raise BridgeError(f"a device message lacks its device: {str(data)[:120]}")
        messages.append(LiveMessage(_TOPICS[topic], site, data))
    return messages


def _device_data_ok(data: Mapping[str, Any]) -> bool:
    return (
        isinstance(data.get("agent"), str)
        and isinstance(data.get("device_key"), str)
        and _indexes_or_none(data.get("channels"))
        and _indexes_or_none(data.get("gone"))
    )


def _indexes_or_none(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(type(i) is int for i in value))


class LiveBridge:
    """Forwards the local hub's device and alert messages to other collector processes, and back."""

    def __init__(
        self, nc: Client, hub: LiveHub, *, origin: str | None = None, announce_s: float = ANNOUNCE_S
    ) -> None:
        self.nc = nc
        self.hub = hub
        self.origin = origin or secrets.token_hex(6)
        self.subject = f"{LIVE_SUBJECT_PREFIX}.{self.origin}"
        self.announce_s = announce_s
        self.stats = BridgeStats()
        self._outbox: list[LiveMessage] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        # Other collector processes, by origin: when each was last heard from (monotonic s).
        self._peers: dict[str, float] = {}
        self._echoed = asyncio.Event()

    def peers(self) -> int:
        """How many other collector processes were heard from within three announcement intervals."""
        now = time.monotonic()
        for origin, seen in list(self._peers.items()):
            if now - seen > 3 * self.announce_s:
                del self._peers[origin]
                log.info("live bridge: a collector process went quiet", extra={"origin": origin})
        if not self._peers:
            self._hook(on=False)
        return len(self._peers)

    def _hook(self, *, on: bool) -> None:
        # Hooked into the hub only while another process listens: a lone collector's ingest
        # publishes on its hub without calling the bridge at all.
        if on:
            self.hub.forward = self._forward
        elif self.hub.forward == self._forward:
            self.hub.forward = None

    async def start(self) -> None:
        """Subscribe to the other processes' messages, announce this one, start forwarding."""
        self._sub = await self.nc.subscribe(f"{LIVE_SUBJECT_PREFIX}.*", cb=self._on_payload)
        # Subscribed for sure only once the announcement comes back: nats-py's flush PING can
        # overtake a SUB still queued, so a flush alone does not prove it.
        await self._announce()
        try:
            await asyncio.wait_for(self._echoed.wait(), SUBSCRIBE_WAIT_S)
        except TimeoutError:
            log.warning("live bridge: own announcement not seen back; going on")
        self._tasks = [
            asyncio.create_task(self._run(), name="live-bridge"),
            asyncio.create_task(self._announce_loop(), name="live-bridge-announce"),
        ]

    async def close(self) -> None:
        """Unsubscribe, stop forwarding, send what is waiting."""
        # Unsubscribed first: a peer heard from now would hook the bridge into the hub again.
        if self._sub is not None:
            with contextlib.suppress(NatsError, OSError):
                await self._sub.unsubscribe()
            self._sub = None
        self._hook(on=False)
        await cancel_all(self._tasks)
        self._tasks = []
        await self._send_waiting()

    def _forward(self, message: LiveMessage) -> None:
        # Called by the hub for each message it publishes; never waits.
        if message.topic is Topic.METER:
            return
        self._outbox.append(message)
        self._wake.set()

    async def _announce(self) -> None:
        try:
            await self.nc.publish(self.subject, encode_messages([]))
        except (NatsError, OSError) as exc:
            log.warning("live bridge announcement failed", extra={"error": str(exc)})

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.announce_s)
            await self._announce()
            self.peers()  # forgets those gone quiet: with none left, nothing is forwarded

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_waiting()

    async def _send_waiting(self) -> None:
        waiting, self._outbox = self._outbox, []
        for start in range(0, len(waiting), _CHUNK_MESSAGES):
            chunk = waiting[start : start + _CHUNK_MESSAGES]
            try:
                await self.nc.publish(self.subject, encode_messages(chunk))
            except (NatsError, OSError, TypeError, ValueError) as exc:
                # TypeError/ValueError: data msgpack cannot carry (a bug of the sender, not of
                # the link); either way the other processes' views catch up with the next change.
                self.stats.failed += len(chunk)
                log.warning("live bridge publish failed", extra={"messages": len(chunk), "error": str(exc)})
                continue
            self.stats.sent += len(chunk)
            self.stats.payloads_sent += 1

    async def _on_payload(self, msg: Msg) -> None:
        if msg.subject == self.subject:
            self._echoed.set()
            return  # our own, already on the local hub
        origin = msg.subject[len(LIVE_SUBJECT_PREFIX) + 1 :]
        try:
            messages = decode_messages(msg.data)
        except BridgeError as exc:
            self.stats.bad += 1
            if self.stats.bad % _LOG_EVERY == 1:
                log.warning(
                    "bad live bridge payload dropped",
                    extra={"subject": msg.subject, "error": str(exc), "bad_so_far": self.stats.bad},
                )
            return
        joined = origin not in self._peers
        self._peers[origin] = time.monotonic()
        if joined:
            self._hook(on=True)
            log.info("live bridge: another collector process joined", extra={"origin": origin})
            # It started after this one's last announcement: answer, so that it forwards too.
            await self._announce()
        self.stats.received += len(messages)
        for message in messages:
            self.hub.publish(message, forward=False)
