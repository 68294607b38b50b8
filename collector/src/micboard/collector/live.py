"""LiveHub: in-process publish/subscribe of device changes, alerts and meters for live views.

Guarantee: publishing never blocks and never waits for a subscriber. Each subscriber has a
bounded queue (``max_queue`` messages); when it is full the *oldest* queued message is dropped
so that a slow reader catches up on the newest state, and the drop is counted on the
subscription (so a WebSocket can tell its client to resynchronize) and on the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)


class Topic(StrEnum):
    """What a live message is about."""

    DEVICE = "device"
    ALERT = "alert"
    METER = "meter"


@dataclass(frozen=True, slots=True)
class LiveMessage:
    """One message to live subscribers; ``data`` is JSON-ready."""

    topic: Topic
    site: str
    data: Mapping[str, Any]


@dataclass(slots=True)
class HubStats:
    """Counters of the hub, exported as metrics."""

    published: int = 0
    delivered: int = 0
    dropped: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


class Subscription:
    """A subscriber's bounded queue; iterate it, and close it (or leave the ``async with``) when done."""

    def __init__(
        self,
        hub: LiveHub,
        max_queue: int,
        topics: frozenset[Topic] | None,
        sites: frozenset[str] | None,
    ) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[LiveMessage | None] = asyncio.Queue(maxsize=max_queue)
        self.topics = topics
        self.sites = sites
        self.dropped = 0
        self.closed = False

    def wants(self, message: LiveMessage) -> bool:
        """Whether this subscription's filters let ``message`` through."""
        if self.topics is not None and message.topic not in self.topics:
            return False
        return self.sites is None or message.site in self.sites

    def _offer(self, message: LiveMessage) -> bool:
        dropped = False
        if self._queue.full():
            # Drop the oldest: for live views the newest state matters most.
            self._queue.get_nowait()
            self.dropped += 1
            dropped = True
        self._queue.put_nowait(message)
        return not dropped

    async def get(self) -> LiveMessage | None:
        """The next message, or ``None`` once the subscription is closed."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    def pending(self) -> int:
        """How many messages wait in the queue."""
        return self._queue.qsize()

    def drain(self) -> list[LiveMessage]:
        """Take every message waiting now, without waiting (the close marker stays queued)."""
        taken: list[LiveMessage] = []
        while not self._queue.empty():
            message = self._queue.get_nowait()
            if message is None:
                self._queue.put_nowait(None)  # for the reader in get(); nothing follows it
                break
            taken.append(message)
        return taken

    def close(self) -> None:
        """Stop receiving; a reader waiting in :meth:`get` wakes up with ``None``."""
        if self.closed:
            return
        self.closed = True
        self._hub.unsubscribe(self)
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[LiveMessage]:
        while True:
            message = await self.get()
            if message is None:
                return
            yield message

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()


class LiveHub:
    """Fans out device changes, alerts and meters to in-process subscribers (the WebSocket)."""

    def __init__(self, *, default_max_queue: int = 256) -> None:
        if default_max_queue < 1:
            raise ValueError("default_max_queue must be at least 1")
        self.default_max_queue = default_max_queue
        self.stats = HubStats()
        self._subscriptions: set[Subscription] = set()
        #: Called with each message published here (not with one published ``forward=False``):
        #: the :class:`~micboard.collector.live_bridge.LiveBridge` to other collector processes.
        self.forward: Callable[[LiveMessage], None] | None = None

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscriptions)

    def subscribe(
        self,
        *,
        max_queue: int | None = None,
        topics: frozenset[Topic] | None = None,
        sites: frozenset[str] | None = None,
    ) -> Subscription:
        """Open a subscription, optionally only to some topics or sites."""
        size = self.default_max_queue if max_queue is None else max_queue
        if size < 1:
            raise ValueError("max_queue must be at least 1")
        subscription = Subscription(self, size, topics, sites)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget ``subscription`` (closing it does this)."""
        self._subscriptions.discard(subscription)

    def publish(self, message: LiveMessage, *, forward: bool = True) -> int:
        """Offer ``message`` to every interested subscriber without waiting; returns how many got it.

        ``forward``: also hand it to :attr:`forward` (false for what came from another process).
        """
        if forward and self.forward is not None:
            self.forward(message)
        self.stats.published += 1
        self.stats.by_topic[message.topic.value] = self.stats.by_topic.get(message.topic.value, 0) + 1
        reached = 0
        for subscription in list(self._subscriptions):
            if not subscription.wants(message):
                continue
            if not subscription._offer(message):
                self.stats.dropped += 1
            reached += 1
        self.stats.delivered += reached
        return reached

    def publish_device(self, site: str, agent: str, device_key: str, data: Mapping[str, Any]) -> int:
        """Publish a device's changed state (a snapshot, or the changed fields with ``status``)."""
        return self.publish(
            LiveMessage(Topic.DEVICE, site, {"site": site, "agent": agent, "device_key": device_key, **data})
        )

    def publish_alert(self, site: str, data: Mapping[str, Any]) -> int:
        """Publish an alert that opened, was acknowledged or resolved."""
        return self.publish(LiveMessage(Topic.ALERT, site, dict(data)))

    def publish_meter(self, site: str, agent: str, device_key: str, data: Mapping[str, Any]) -> int:
        """Publish live levels of a device's channels (latest wins)."""
        return self.publish(
            LiveMessage(Topic.METER, site, {"site": site, "agent": agent, "device_key": device_key, **data})
        )

    def close(self) -> None:
        """Close every subscription, waking their readers."""
        for subscription in list(self._subscriptions):
            subscription.close()
