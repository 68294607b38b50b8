"""Store-and-forward publishing: JetStream events are written ahead to the outbox and removed when acked.

How an event travels:

- ``meter`` (core NATS): published if the link is up, else dropped and counted
  (``dropped_meter``): levels are only worth their latest value. Never stored.
- JetStream kinds: numbered by the :class:`~micboard.agent.publisher.EnvelopeFactory`, encoded
  once, queued for the outbox and published with ``Nats-Msg-Id: <agent>.<boot>.<seq>``. The
  outbox write is a group commit every 100 ms; an event acked before its commit never touches
  the disk, so a healthy link costs (almost) no writes, and a SIGKILL loses at most the events
  of the last 100 ms that had not reached NATS either. When a publish fails or times out, the
  event stays in the outbox and is retried after a capped, jittered backoff; the event is
  drained from there in order.

Ordering: events are sent in *lanes*, one per device (keyed by ``device_key``) plus one for the
agent's own events. A lane has at most one publish in flight: its next event is published only
after the previous one was acked (or dropped for good). A lane whose events are waiting in the
outbox therefore holds its new events back behind them, and per-device order in the stream is
the order the agent produced. This is the price of the collector ignoring an event older than
what it has applied: a pipelined lane could, after a lost publish, store a later event before an
earlier one, which the collector would then discard. Lanes publish concurrently, at most
``max_in_flight`` at a time, oldest waiting event first; so live events of a device without a
backlog keep flowing while other devices drain. Draining one device runs at about one event
per round trip (about 20 per second on a 50 ms WAN link, thousands on a LAN).

A lane keeps at most 32 events in memory; the rest wait on disk and are read back in pages, so
memory stays bounded however long the link is down.

Shutdown (:meth:`EventSender.close`): stop accepting events (``dropped_closed``), give in-flight
publishes a short grace to be acked, then cancel them (their events are in the outbox already),
commit the outbox, checkpoint it (fsync) and close the connection, all within the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from micboard.agent.outbox import Outbox, OutboxError, OutboxRecord, OutboxStats
from micboard.agent.publisher import connect, now_ms
from micboard.shared.codec import DEFAULT_MAX_BYTES, encode
from micboard.shared.envelope import AnyEvent, DeviceEvent, OfflineEvent
from micboard.shared.errors import WireError
from micboard.shared.logs import LogThrottle
from micboard.shared.subjects import JETSTREAM_KINDS, Kind, build_subject, msg_id

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Events of one lane kept in memory; the rest wait in the outbox and are read back in pages.
LANE_BUFFER = 32
#: Group-commit delay of the outbox: an event acked within it is never written.
COMMIT_DELAY_S = 0.1
_MIN_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0
_EXPIRE_EVERY_S = 10.0
_NATS_CLOSE_RESERVE_S = 0.5


#: How often one and the same permissions violation is logged again while it keeps happening.
PERMISSIONS_LOG_EVERY_S = 30.0
# nats-py lower-cases the server's -ERR text ("Permissions Violation for Publish to ...").
_PERMISSIONS_VIOLATION = "permissions violation"


@dataclass(slots=True)
class _Counters:
    published: int = 0
    acked: int = 0
    duplicates: int = 0
    outboxed: int = 0
    drained: int = 0
    failures: int = 0
    meters_published: int = 0
    dropped_meter: int = 0
    dropped_rejected: int = 0
    dropped_closed: int = 0
    dropped_io: int = 0
    in_flight: int = 0
    reconnects: int = 0
    connected: bool = False
    last_publish_error: str | None = None


@dataclass(frozen=True, slots=True)
class SenderStats:
    """A snapshot of the sender's counters and its outbox, for the heartbeat and /metrics."""

    published: int
    """JetStream publish attempts, retries included."""
    acked: int
    """Events acked by JetStream (``duplicates`` included)."""
    duplicates: int
    """Acks saying the stream already had the event (a retry after a lost ack, or a replay)."""
    outboxed: int
    """Events that had to wait in the outbox: link down, a failed publish, or behind a backlog."""
    drained: int
    """Acked events that had waited in the outbox (in this run or a previous one)."""
    failures: int
    """Publishes that failed or were not acked within the timeout."""
    in_flight: int
    reconnects: int
    connected: bool
    last_publish_error: str | None
    meters_published: int
    dropped_meter: int
    """Meters dropped because the link was down (by design: latest wins, never stored)."""
    dropped_full: int
    """Events the outbox dropped to stay within its byte bound."""
    dropped_age: int
    """Events the outbox expired by its age bound."""
    dropped_rejected: int
    """Events refused for good: larger than the cap, or rejected by the server as invalid."""
    dropped_closed: int
    """Events handed over after :meth:`EventSender.close` began."""
    dropped_io: int
    """Events lost because the outbox could not be written (disk full, I/O error)."""
    outbox_depth: int
    outbox_bytes: int
    outbox_oldest_age_s: float | None
    outbox_corrupt_recoveries: int

    @property
    def dropped(self) -> int:
        """JetStream events lost for any reason (meters, which are never kept, not included)."""
        return (
            self.dropped_full
            + self.dropped_age
            + self.dropped_rejected
            + self.dropped_closed
            + self.dropped_io
        )


@dataclass(slots=True)
class _Item:
    record: OutboxRecord
    outboxed: bool


class _Lane:
    """The events of one device (or of the agent itself) that still have to be published, in order."""

    __slots__ = ("buffer", "busy", "disk_tail", "floor", "key", "spilled")

    def __init__(self, key: str) -> None:
        self.key = key
        self.buffer: deque[_Item] = deque()
        # True when some of this lane's events are only on disk, all newer than the buffer's.
        self.spilled = False
        self.disk_tail = 0
        self.floor = 0  # id of the last event that left the lane (acked or dropped)
        self.busy = False


class EventSender:
    """Publishes events with store-and-forward through an :class:`Outbox` (see the module doc).

    ``await start()``, then ``await send(event)`` as often as needed (it never raises for link
    or disk problems), then ``await close()``. Connects in the background: NATS may be down
    at start, events wait in the outbox meanwhile.
    """

    def __init__(
        self,
        url: str,
        outbox: Outbox,
        *,
        name: str = "micboard-agent",
        publish_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        max_in_flight: int = 64,
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.url = url
        self.outbox = outbox
        self.name = name
        self.publish_timeout_s = publish_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.connect_options = dict(connect_options or {})
        self._counters = _Counters()
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lanes: dict[str, _Lane] = {}
        self._puts: dict[int, OutboxRecord] = {}
        self._deletes: list[int] = []
        self._next_id = 0
        self._wake_pump = asyncio.Event()
        self._ops_ready = asyncio.Event()
        self._publishes: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self._failing = False
        self._unreachable_warned = False
        self._refusals = LogThrottle(PERMISSIONS_LOG_EVERY_S)

    # -- public face -------------------------------------------------------------------------

    @property
    def nc(self) -> Client | None:
        """The NATS connection once established (for subscriptions such as commands)."""
        return self._nc

    @property
    def stats(self) -> SenderStats:
        """The counters of the sender and of its outbox, as of now."""
        c = self._counters
        o = self.outbox.stats()
        return SenderStats(
            published=c.published,
            acked=c.acked,
            duplicates=c.duplicates,
            outboxed=c.outboxed,
            drained=c.drained,
            failures=c.failures,
            in_flight=c.in_flight,
            reconnects=c.reconnects,
            connected=c.connected,
            last_publish_error=c.last_publish_error,
            meters_published=c.meters_published,
            dropped_meter=c.dropped_meter,
            dropped_full=o.dropped_full,
            dropped_age=o.dropped_age,
            dropped_rejected=c.dropped_rejected,
            dropped_closed=c.dropped_closed,
            dropped_io=c.dropped_io,
            outbox_depth=o.depth,
            outbox_bytes=o.bytes,
            outbox_oldest_age_s=o.oldest_age_s,
            outbox_corrupt_recoveries=o.corrupt_recoveries,
        )

    def outbox_stats(self) -> OutboxStats:
        """Depth, bytes, oldest age and drop counters of the outbox."""
        return self.outbox.stats()

    async def start(self) -> None:
        """Open the outbox (resuming what a previous run left in it) and start connecting."""
        if self._state != "new":
            raise RuntimeError("an EventSender starts once")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="micboard-outbox")
        try:
            await self._db(self.outbox.open)
            self._next_id = await self._db(self.outbox.max_id)
            lanes = await self._db(self.outbox.lanes)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        for key, tail in lanes.items():
            lane = self._lane(key)
            lane.spilled, lane.disk_tail = True, tail
        backlog = self.outbox.stats()
        log.info(
            "sender started",
            extra={"outbox": str(self.outbox.path), "depth": backlog.depth, "bytes": backlog.bytes},
        )
        self._state = "running"
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connect_loop(), name="micboard-sender-connect"),
            loop.create_task(self._pump_loop(), name="micboard-sender-pump"),
            loop.create_task(self._write_loop(), name="micboard-sender-outbox"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def send(self, event: AnyEvent) -> None:
        """Publish ``event`` or keep it for later; never raises for link or disk problems.

        A dropped event (too large, meter while offline, after :meth:`close`) is counted in
        :attr:`stats`.
        """
        if self._state != "running":
            self._counters.dropped_closed += 1
            return
        kind = Kind(event.kind)
        try:
            payload = encode(event, max_bytes=self.max_message_bytes)
        except WireError as exc:
            self._counters.dropped_rejected += 1
            log.error("event refused: too large to send", extra={"kind": kind.value, "error": exc.message})
            return
        subject = build_subject(event.site, event.agent, kind)
        if kind not in JETSTREAM_KINDS:
            await self._send_core(subject, payload)
            return
        device_key: str | None = None
        if isinstance(event, DeviceEvent | OfflineEvent):
            device_key = event.body.device_key
        self._next_id += 1
        record = OutboxRecord(
            id=self._next_id,
            subject=subject,
            msg_id=msg_id(event.agent, event.boot, event.seq),
            kind=kind.value,
            payload=payload,
            created_ms=now_ms(),
            device_key=device_key,
            is_snapshot=isinstance(event, DeviceEvent) and event.body.is_snapshot,
        )
        self._puts[record.id] = record
        self._ops_ready.set()
        item = _Item(record, outboxed=not self._link_usable())
        lane = self._lane(record.lane)
        if lane.spilled or len(lane.buffer) >= LANE_BUFFER:
            lane.spilled, lane.disk_tail = True, record.id
            item.outboxed = True
        else:
            lane.buffer.append(item)
            self._wake_pump.set()
        if item.outboxed:
            self._counters.outboxed += 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting events, keep every unacked one in the outbox, return within ``timeout_s``."""
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._state = "closing"
        # A short grace saves republishing (deduplicated anyway) events whose ack is on its way.
        if self._publishes:
            await asyncio.wait(set(self._publishes), timeout=min(0.5, timeout_s * 0.1))
        tasks = [*self._tasks, *self._publishes]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: no task may hold the shutdown past its deadline, whatever it does with the
            # cancellation; those still running are cancelled again when the loop closes.
            await asyncio.wait(tasks, timeout=max(0.1, (deadline - loop.time() - _NATS_CLOSE_RESERVE_S) / 2))
        self._tasks = []
        try:
            budget = max(0.1, deadline - loop.time() - _NATS_CLOSE_RESERVE_S)
            async with asyncio.timeout(budget):
                await self._flush_and_close_outbox()
        except TimeoutError:
            log.error("outbox not closed within the shutdown deadline", extra={"path": str(self.outbox.path)})
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await nc.close()
            except (TimeoutError, NatsError, OSError) as exc:
                log.warning("NATS connection not closed cleanly", extra={"error": str(exc)})
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._state = "closed"
        self._counters.connected = False
        outbox = self.outbox.stats()
        log.info(
            "sender closed",
            extra={
                "acked": self._counters.acked,
                "outbox_depth": outbox.depth,
                "outbox_bytes": outbox.bytes,
                "dropped": self.stats.dropped,
            },
        )

    async def __aenter__(self) -> EventSender:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- core NATS ---------------------------------------------------------------------------

    async def _send_core(self, subject: str, payload: bytes) -> bool:
        nc = self._nc
        if nc is None or not nc.is_connected:
            self._counters.dropped_meter += 1
            return False
        try:
            await nc.publish(subject, payload)
        except (NatsError, OSError) as exc:
            self._counters.dropped_meter += 1
            log.debug("meter dropped", extra={"error": str(exc)})
            return False
        self._counters.meters_published += 1
        return True

    # -- the outbox thread -------------------------------------------------------------------

    async def _db(self, fn: Callable[..., _T], *args: Any) -> _T:
        # One thread owns the SQLite connection; jobs run in the order they were submitted.
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _flush(self) -> None:
        puts, self._puts = list(self._puts.values()), {}
        deletes, self._deletes = self._deletes, []
        if not puts and not deletes:
            return
        try:
            dropped = await self._db(self.outbox.write, puts, deletes)
        except OutboxError as exc:
            self._counters.dropped_io += len(puts)
            log.error("outbox write failed: events lost", extra={"events": len(puts), "error": str(exc)})
            return
        if dropped:
            self._forget(set(dropped))

    def _forget(self, dropped: set[int]) -> None:
        # Dropped by the outbox's bounds: do not publish them after all (an in-flight one goes on).
        for lane in self._lanes.values():
            if not lane.buffer:
                continue
            head = lane.buffer[0] if lane.busy else None
            kept = [i for i in lane.buffer if i is head or i.record.id not in dropped]
            if len(kept) != len(lane.buffer):
                lane.buffer = deque(kept)

    async def _flush_and_close_outbox(self) -> None:
        await self._flush()
        await self._db(self.outbox.close)

    def _housekeeping(self, expire: bool) -> list[int]:
        expired = self.outbox.expire() if expire else []
        self.outbox.maybe_sync()
        return expired

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.outbox.fsync_interval_s or 1.0)
        delay = min(COMMIT_DELAY_S, self.outbox.fsync_interval_s or COMMIT_DELAY_S)
        next_expire = loop.time()
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives together with the event, and this task would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._ops_ready.wait()
            if self._ops_ready.is_set():
                await asyncio.sleep(delay)
                self._ops_ready.clear()
                await self._flush()
            expire = loop.time() >= next_expire
            if expire:
                next_expire = loop.time() + _EXPIRE_EVERY_S
            try:
                expired = await self._db(self._housekeeping, expire)
            except OutboxError as exc:
                log.error("outbox housekeeping failed", extra={"error": str(exc)})
                continue
            if expired:
                self._forget(set(expired))

    # -- connection --------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        delay = _MIN_BACKOFF_S
        warned = False
        while self._nc is None:
            try:
                # The sender's callbacks and "no buffering while disconnected" (an event is either
                # sent or in the outbox) win over the caller's options (credentials, TLS).
                options: dict[str, Any] = {
                    **self.connect_options,
                    "pending_size": 0,
                    "disconnected_cb": self._on_disconnected,
                    "reconnected_cb": self._on_reconnected,
                    "error_cb": self._on_error,
                }
                nc = await connect(
                    self.url, name=self.name, connect_timeout_s=self.connect_timeout_s, **options
                )
            except (NatsError, OSError, TimeoutError) as exc:
                self._counters.last_publish_error = f"connect: {type(exc).__name__}: {exc}"
                (log.debug if warned else log.warning)(
                    "NATS unreachable, keeping events in the outbox",
                    extra={"url": self.url, "error": str(exc), "retry_in_s": round(delay, 2)},
                )
                warned = True
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter  # nosec B311
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            self._nc = nc
            self._js = nc.jetstream(timeout=self.publish_timeout_s)
            self._counters.connected = True
            self._unreachable_warned = False
            log.info("connected to NATS", extra={"url": self.url})
            self._wake_pump.set()

    async def _on_disconnected(self) -> None:
        self._counters.connected = False
        if self._state == "running" and not self._unreachable_warned:
            self._unreachable_warned = True
            log.warning("NATS link lost, keeping events in the outbox", extra={"url": self.url})

    async def _on_reconnected(self) -> None:
        self._counters.connected = True
        self._unreachable_warned = False
        self._counters.reconnects += 1
        self._retry_at = 0.0
        self._backoff_s = 0.0
        log.info("NATS link back, draining the outbox", extra={"depth": self.outbox.stats().depth})
        self._wake_pump.set()

    async def _on_error(self, exc: Exception) -> None:
        # nats-py retries the first connect too (reconnects forever) and reports each try here.
        error = f"{type(exc).__name__}: {exc}"
        if _PERMISSIONS_VIOLATION in str(exc).lower():
            # The server refused a publish or a subscription of this agent's NATS user: a
            # configuration mismatch (site or agent name, an outdated server configuration) that
            # lasts until someone fixes it, while refused meters are lost and refused events wait
            # in the outbox. Said loudly, and in the heartbeat.
            self._counters.last_publish_error = str(exc)[:500]
            repeated = self._refusals.due(str(exc))
            if repeated is not None:
                log.error(
                    "NATS refused this agent's publish or subscription (permissions violation)",
                    extra={"error": str(exc), **({"repeated": repeated} if repeated else {})},
                )
            return
        if self._counters.connected:
            log.debug("NATS client error", extra={"error": error})
            return
        self._counters.last_publish_error = f"nats: {error}"
        if not self._unreachable_warned:
            self._unreachable_warned = True
            log.warning(
                "NATS unreachable, keeping events in the outbox", extra={"url": self.url, "error": error}
            )

    def _link_usable(self) -> bool:
        nc = self._nc
        return (
            nc is not None
            and nc.is_connected
            and self._js is not None
            and asyncio.get_running_loop().time() >= self._retry_at
        )

    # -- publishing --------------------------------------------------------------------------

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        return lane

    async def _pump_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            timeout = 1.0
            if self._retry_at > loop.time():
                timeout = min(timeout, self._retry_at - loop.time())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives together with the event, and this task would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.01)):
                    await self._wake_pump.wait()
            self._wake_pump.clear()
            if not self._link_usable():
                continue
            await self._refill()
            self._start_publishes()
            self._prune_lanes()

    async def _refill(self) -> None:
        """Read the next page of events from disk for lanes whose memory is empty."""
        hungry = [lane for lane in self._lanes.values() if lane.spilled and not lane.buffer and not lane.busy]
        if not hungry:
            return
        # Remember each lane's newest event on disk before committing what is queued: an event
        # sent while we read is newer, so the lane stays spilled and the next page gets it.
        tails = {lane.key: lane.disk_tail for lane in hungry}
        await self._flush()
        for lane in hungry[: self.max_in_flight]:
            try:
                records = await self._db(self.outbox.read_lane, lane.key, lane.floor, LANE_BUFFER)
            except (OutboxError, OSError) as exc:
                log.error("outbox read failed", extra={"lane": lane.key, "error": str(exc)})
                return
            lane.buffer.extend(_Item(record, outboxed=True) for record in records)
            if len(records) < LANE_BUFFER and lane.disk_tail == tails[lane.key]:
                lane.spilled = False

    def _start_publishes(self) -> None:
        free = self.max_in_flight - self._counters.in_flight
        if free <= 0:
            return
        ready = [lane for lane in self._lanes.values() if lane.buffer and not lane.busy]
        ready.sort(key=lambda lane: lane.buffer[0].record.id)  # oldest waiting event first
        loop = asyncio.get_running_loop()
        for lane in ready[:free]:
            lane.busy = True
            self._counters.in_flight += 1
            task = loop.create_task(self._publish(lane, lane.buffer[0]))
            self._publishes.add(task)
            task.add_done_callback(self._publishes.discard)

    def _prune_lanes(self) -> None:
        if len(self._lanes) < 256:
            return
        for key in [k for k, lane in self._lanes.items() if not (lane.buffer or lane.busy or lane.spilled)]:
            del self._lanes[key]

    async def _publish(self, lane: _Lane, item: _Item) -> None:
        record = item.record
        js = self._js
        try:
            if js is None:
                raise NatsError("not connected")
            self._counters.published += 1
            ack = await js.publish(
                record.subject,
                record.payload,
                timeout=self.publish_timeout_s,
                headers={"Nats-Msg-Id": record.msg_id},
            )
        except (BadRequestError, MaxPayloadError) as exc:
            self._done(lane, item)
            self._counters.dropped_rejected += 1
            log.error(
                "event refused by the server, dropped",
                extra={"msg_id": record.msg_id, "error": f"{type(exc).__name__}: {exc}"},
            )
        except (NatsError, TimeoutError, OSError) as exc:
            self._failed(item, exc)
        else:
            self._done(lane, item)
            self._counters.acked += 1
            self._counters.duplicates += bool(ack.duplicate)
            self._counters.drained += item.outboxed
            if self._failing:
                self._failing = False
                log.info("publishing again", extra={"depth": self.outbox.stats().depth})
            self._backoff_s = 0.0
        finally:
            lane.busy = False
            self._counters.in_flight -= 1
            self._wake_pump.set()

    def _done(self, lane: _Lane, item: _Item) -> None:
        if lane.buffer and lane.buffer[0] is item:
            lane.buffer.popleft()
        lane.floor = max(lane.floor, item.record.id)
        # Acked before its commit: it never needs to touch the disk.
        if self._puts.pop(item.record.id, None) is None:
            self._deletes.append(item.record.id)
            self._ops_ready.set()

    def _failed(self, item: _Item, exc: BaseException) -> None:
        self._counters.failures += 1
        self._counters.last_publish_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if not item.outboxed:
            item.outboxed = True
            self._counters.outboxed += 1
        self._backoff_s = min(max(self._backoff_s * 2, _MIN_BACKOFF_S), _MAX_BACKOFF_S)
        jitter = 0.5 + random.random() / 2  # noqa: S311 - jitter, not security  # nosec B311
        self._retry_at = asyncio.get_running_loop().time() + self._backoff_s * jitter
        if not self._failing:
            self._failing = True
            log.warning(
                "publish failed, keeping events in the outbox",
                extra={"msg_id": item.record.msg_id, "error": self._counters.last_publish_error},
            )


def _report_crash(task: asyncio.Task[None]) -> None:
    # The sender's loops run until close() cancels them; ending any other way is a bug to shout about.
    if not task.cancelled() and task.exception() is not None:
        log.critical("sender task crashed", exc_info=task.exception(), extra={"task": task.get_name()})
