"""Publishing events to NATS: envelopes with a per-boot sequence, JetStream with ``Nats-Msg-Id``."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import FlushTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import BaseModel

from micboard.shared.codec import encode
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    DiscoveredBody,
    DiscoveredEvent,
    HeartbeatBody,
    HeartbeatEvent,
    HelloBody,
    HelloEvent,
    MeterBody,
    MeterEvent,
    OfflineBody,
    OfflineEvent,
)
from micboard.shared.subjects import JETSTREAM_KINDS, Kind, build_subject, msg_id

log = logging.getLogger(__name__)

_EVENT_TYPES: dict[type[BaseModel], type[AnyEvent]] = {
    HelloBody: HelloEvent,
    HeartbeatBody: HeartbeatEvent,
    DeviceBody: DeviceEvent,
    OfflineBody: OfflineEvent,
    DiscoveredBody: DiscoveredEvent,
    MeterBody: MeterEvent,
}


def new_boot_id() -> str:
    """A random id for one agent start; with ``seq`` it names every event of this boot."""
    return secrets.token_hex(8)


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit of the envelope's ``ts``."""
    return time.time_ns() // 1_000_000


class EnvelopeFactory:
    """Wraps bodies in envelopes: site, agent, boot and the per-boot sequence (+1 per JetStream event)."""

    def __init__(self, site: str, agent: str, boot: str | None = None) -> None:
        self.site = site
        self.agent = agent
        self.boot = boot or new_boot_id()
        self._seq = 0

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest JetStream event made."""
        return self._seq

    def make(self, body: BaseModel) -> AnyEvent:
        """Wrap ``body`` in the envelope of its kind, numbering JetStream kinds."""
        event_type = _EVENT_TYPES[type(body)]
        kind = Kind(event_type.model_fields["kind"].default)
        if kind in JETSTREAM_KINDS:
            self._seq += 1
            seq = self._seq
        else:
            seq = 0
        fields: dict[str, Any] = {
            "site": self.site, "agent": self.agent, "boot": self.boot,
            "seq": seq, "ts": now_ms(), "body": body,
        }  # fmt: skip
        return event_type(**fields)

    def subject(self, event: AnyEvent) -> str:
        """The subject ``event`` is published on."""
        return build_subject(event.site, event.agent, event.kind)


class JetStreamPublisher:
    """Publishes events: JetStream kinds with ``Nats-Msg-Id`` and an awaited ack, meters on core NATS."""

    def __init__(self, nc: Client, *, timeout_s: float = 5.0, max_bytes: int = 256 * 1024) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=timeout_s)
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    async def publish(self, event: AnyEvent) -> PubAck | None:
        """Publish ``event``; returns the JetStream ack, or ``None`` for core NATS kinds."""
        subject = build_subject(event.site, event.agent, event.kind)
        payload = encode(event, max_bytes=self.max_bytes)
        if Kind(event.kind) in JETSTREAM_KINDS:
            headers = {"Nats-Msg-Id": msg_id(event.agent, event.boot, event.seq)}
            return await self.js.publish(subject, payload, timeout=self.timeout_s, headers=headers)
        await self.nc.publish(subject, payload)
        return None


#: How long a round trip that missed its deadline may still wait for its PONG (see :func:`round_trip`).
#: By then the client's stale-connection check (``nats_max_outstanding_pings`` unanswered pings,
#: ``nats_ping_interval_s`` apart: 40 s by default, 10 minutes at most) has reconnected, which drops
#: every PONG still awaited on the old connection.
_LATE_PONG_S = 600


async def round_trip(nc: Client, timeout_s: float) -> None:
    """Wait until the server has answered a PING sent after everything written so far.

    ``Client.flush(timeout)`` cancels the future its PONG resolves when the deadline passes. The
    PONG that arrives later then meets a cancelled future: nats-py's read loop fails on it and
    stops, and nothing more is received on that connection (JetStream acks, commands) until its
    stale-connection check reconnects minutes later. Here the deadline is kept outside the
    flush, which goes on waiting for its PONG in the background (at most ``_LATE_PONG_S``).

    Raises :class:`nats.errors.FlushTimeoutError` when no answer came within ``timeout_s``.
    """
    flush = asyncio.ensure_future(nc.flush(timeout=_LATE_PONG_S))
    # Past our deadline or our cancellation, how the background flush ends is not news.
    flush.add_done_callback(_ignore_result)
    try:
        await asyncio.wait_for(asyncio.shield(flush), timeout_s)
    except TimeoutError:
        raise FlushTimeoutError from None


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def connect(url: str, *, name: str, connect_timeout_s: float = 2.0, **options: Any) -> Client:
    """Connect to NATS and keep reconnecting forever when the link drops."""
    return await nats.connect(
        servers=[url],
        name=name,
        connect_timeout=connect_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        allow_reconnect=True,
        **options,
    )
