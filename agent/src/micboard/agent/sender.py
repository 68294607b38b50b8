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

Replayable: a delta builds on the device's previous events. When the outbox had to drop deltas
of a device's newest state (its byte bound's last resort, see :mod:`micboard.agent.outbox`), or
events of a device were lost to a failing disk (below), the device's next deltas would build on
what was lost: they are dropped too, and counted (``dropped_full`` or ``dropped_io``), until the
device's next snapshot.

Outbox failures never stop the sender. A failed outbox write (disk full, I/O error) keeps its
events and its acks in memory and is tried again after a capped backoff (0.25 s to 5 s); lanes
are served from memory meanwhile, so a healthy link still gets every event. Events waiting for
the outbox are held up to ``max_pending_bytes`` (default 16 MiB); past that the oldest of them
that are not about to be published are dropped with the deltas that build on them
(``dropped_io``: events really lost, never one that is still sent). Every outbox error is logged
(the same one at most once a minute) and counted (``outbox_errors``). A loop that ends for any
other reason (a bug) is logged at CRITICAL and reported by :attr:`EventSender.crashed`.

``last_publish_error`` is the error of the latest failed publish or connection attempt; it is
cleared by the next acked publish.

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

from micboard.agent.outbox import Outbox, OutboxRecord, OutboxStats
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
#: Bytes of events kept in memory while the outbox cannot be written (then the oldest are dropped).
MAX_PENDING_BYTES = 16 * 1024 * 1024
#: How often one and the same outbox error is logged again while it keeps happening.
OUTBOX_ERROR_LOG_EVERY_S = 60.0
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
    dropped_unbased: int = 0
    outbox_errors: int = 0
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
    """Events dropped to stay within the outbox's byte bound (and deltas of a device whose newest
    deltas the bound dropped, until its next snapshot)."""
    dropped_age: int
    """Events the outbox expired by its age bound."""
    dropped_rejected: int
    """Events refused for good: larger than the cap, or rejected by the server as invalid."""
    dropped_closed: int
    """Events handed over after :meth:`EventSender.close` began."""
    dropped_io: int
    """Events lost because the outbox could not be written for so long that the events waiting
    for it passed ``max_pending_bytes`` (with the deltas that build on them), or could not be
    written at shutdown. An event still sent from memory is not counted."""
    outbox_depth: int
    outbox_bytes: int
    outbox_oldest_age_s: float | None
    outbox_corrupt_recoveries: int
    outbox_errors: int = 0
    """Outbox operations that failed (writes, reads, expiry, checkpoints); each was retried."""
    dropped_newest: int = 0
    """Of ``dropped_full``: events of a device's newest state (the bound's last resort)."""

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

    __slots__ = ("buffer", "busy", "floor", "key", "spilled", "stored")

    def __init__(self, key: str) -> None:
        self.key = key
        self.buffer: deque[_Item] = deque()
        # True when some of this lane's events are not in the buffer (on disk, or queued for it),
        # all newer than the buffer's.
        self.spilled = False
        self.stored = 0  # id of the newest event of this lane known written to the outbox
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
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if max_pending_bytes < 1:
            raise ValueError("max_pending_bytes must be positive")
        self.url = url
        self.outbox = outbox
        self.name = name
        self.publish_timeout_s = publish_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.connect_options = dict(connect_options or {})
        self.max_pending_bytes = max_pending_bytes
        self._counters = _Counters()
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lanes: dict[str, _Lane] = {}
        self._puts: dict[int, OutboxRecord] = {}
        self._deletes: list[int] = []
        # Records of outbox writes under way (not in _puts any more, maybe not on disk yet).
        self._writing: dict[int, OutboxRecord] = {}
        self._write_jobs: set[asyncio.Future[tuple[list[int], set[str]]]] = set()
        self._flush_lock = asyncio.Lock()
        self._write_retry_at = 0.0
        self._write_backoff_s = 0.0
        # Devices whose next deltas would build on dropped events, with the reason ("full", "io").
        self._unbased: dict[str, str] = {}
        self._snapshot_ids: dict[str, int] = {}  # device -> id of its newest snapshot sent
        self._outbox_errors = LogThrottle(OUTBOX_ERROR_LOG_EVERY_S)
        self._crashed: BaseException | None = None
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
    def crashed(self) -> BaseException | None:
        """The exception that ended one of the sender's loops (a bug), else ``None``.

        Outbox and link errors never end a loop; a loop that ended is not restarted: the agent
        should stop (systemd restarts it, the outbox keeps the events).
        """
        return self._crashed

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
            dropped_full=o.dropped_full + c.dropped_unbased,
            dropped_age=o.dropped_age,
            dropped_rejected=c.dropped_rejected,
            dropped_closed=c.dropped_closed,
            dropped_io=c.dropped_io,
            outbox_depth=o.depth,
            outbox_bytes=o.bytes,
            outbox_oldest_age_s=o.oldest_age_s,
            outbox_corrupt_recoveries=o.corrupt_recoveries,
            outbox_errors=c.outbox_errors,
            dropped_newest=o.dropped_newest + c.dropped_unbased,
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
            lane.spilled, lane.stored = True, tail
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
            task.add_done_callback(self._report_crash)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The sender's running loops (connect, pump, outbox writes), for supervision."""
        return [task for task in self._tasks if not task.done()]

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
        is_snapshot = isinstance(event, DeviceEvent) and event.body.is_snapshot
        if device_key is not None and self._unbased:
            if is_snapshot:
                self._unbased.pop(device_key, None)
            elif kind is not Kind.OFFLINE and (reason := self._unbased.get(device_key)) is not None:
                # Its previous deltas were dropped: this one would merge onto an older state.
                self._count_unbased(reason, 1)
                return
        self._next_id += 1
        record = OutboxRecord(
            id=self._next_id,
            subject=subject,
            msg_id=msg_id(event.agent, event.boot, event.seq),
            kind=kind.value,
            payload=payload,
            created_ms=now_ms(),
            device_key=device_key,
            is_snapshot=is_snapshot,
        )
        if is_snapshot and device_key is not None:
            self._snapshot_ids[device_key] = record.id
        self._puts[record.id] = record
        self._ops_ready.set()
        item = _Item(record, outboxed=not self._link_usable())
        lane = self._lane(record.lane)
        if lane.spilled or len(lane.buffer) >= LANE_BUFFER:
            lane.spilled = True
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

    def _write_job(self, puts: list[OutboxRecord], deletes: list[int]) -> tuple[list[int], set[str]]:
        # On the outbox thread: the write, and which devices' newest state it had to cut.
        dropped = self.outbox.write(puts, deletes)
        return dropped, self.outbox.take_truncated()

    async def _flush(self) -> bool:
        """Write the queued events and acks to the outbox; ``False`` when that failed (kept for later)."""
        # One write at a time: a failed write's events are queued again, ahead of newer ones,
        # so that what is on disk of a lane is always its oldest events.
        async with self._flush_lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        puts, self._puts = self._puts, {}
        deletes, self._deletes = self._deletes, []
        if not puts and not deletes:
            return True
        self._writing.update(puts)
        job = asyncio.get_running_loop().run_in_executor(
            self._executor, self._write_job, list(puts.values()), deletes
        )
        self._write_jobs.add(job)
        try:
            # Shielded: a cancelled flush (shutdown) leaves the write running in its thread, and
            # its outcome is still taken in (close() waits for it before its own flush).
            dropped, truncated = await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda done: self._write_done(done, puts, deletes))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the outbox raised, keep the events
            self._write_done(job, puts, deletes, exc)
            return False
        self._write_done(job, puts, deletes)
        if dropped:
            self._forget(set(dropped))
        if truncated:
            self._cut(truncated, max(puts, default=0))
        return True

    def _write_done(
        self,
        job: asyncio.Future[tuple[list[int], set[str]]],
        puts: dict[int, OutboxRecord],
        deletes: list[int],
        error: BaseException | None = None,
    ) -> None:
        self._write_jobs.discard(job)
        for record_id in puts:
            self._writing.pop(record_id, None)
        if error is None and not job.cancelled():
            error = job.exception()
        if error is None:
            for record in puts.values():
                lane = self._lane(record.lane)
                lane.stored = max(lane.stored, record.id)
            if self._write_backoff_s:
                self._write_backoff_s = 0.0
                log.info("outbox writable again", extra={"pending": len(self._puts)})
            return
        self._outbox_failed("write", error)
        # Nothing of the write happened: try it again later. An event acked meanwhile was never
        # stored, so it is neither written nor deleted; the other acks are deleted next time.
        acked = {record_id for record_id in self._deletes if record_id in puts}
        self._deletes = deletes + [record_id for record_id in self._deletes if record_id not in acked]
        self._puts = {**{i: r for i, r in puts.items() if i not in acked}, **self._puts}
        self._write_backoff_s = min(max(self._write_backoff_s * 2, _MIN_BACKOFF_S), _MAX_BACKOFF_S)
        with contextlib.suppress(RuntimeError):  # no loop any more: close() counts what is left
            self._write_retry_at = asyncio.get_running_loop().time() + self._write_backoff_s
        self._ops_ready.set()
        self._shed()

    def _outbox_failed(self, what: str, error: BaseException) -> None:
        self._counters.outbox_errors += 1
        text = f"{type(error).__name__}: {error}"
        repeated = self._outbox_errors.due(f"{what}: {text}")
        if repeated is not None:
            log.error(
                f"outbox {what} failed, will retry",
                extra={
                    "error": text,
                    "pending": len(self._puts),
                    **({"repeated": repeated} if repeated else {}),
                },
            )

    def _shed(self) -> None:
        """Keep the events waiting for the outbox within ``max_pending_bytes`` (the disk fails)."""
        pending = sum(record.size for record in self._puts.values())
        if pending <= self.max_pending_bytes:
            return
        # Events in a lane's buffer are published from memory anyway: not worth dropping.
        buffered = {item.record.id for lane in self._lanes.values() for item in lane.buffer}
        target = self.max_pending_bytes * 3 // 4
        lost: list[int] = []
        chained: set[str] = set()  # devices whose next waiting deltas build on a dropped event
        for record_id, record in self._puts.items():  # oldest first
            key = record.device_key
            if record_id in buffered:
                continue
            if key is not None and key in chained:
                if record.is_snapshot:
                    chained.discard(key)
                elif record.kind != Kind.OFFLINE.value:
                    lost.append(record_id)
                    pending -= record.size
                    continue
            if pending > target:
                lost.append(record_id)
                pending -= record.size
                if key is not None:
                    chained.add(key)
            elif not chained:
                break
        if not lost:
            return
        for record_id in lost:
            del self._puts[record_id]
        for key in chained:
            self._unbased[key] = "io"
        self._forget(set(lost))
        self._counters.dropped_io += len(lost)
        log.error(
            "outbox not writable and too many events waiting for it: oldest events lost",
            extra={
                "dropped": len(lost),
                "pending_bytes": pending,
                "max_pending_bytes": self.max_pending_bytes,
            },
        )

    def _cut(self, devices: set[str], written_up_to: int) -> None:
        """The outbox dropped the newest deltas of ``devices``: drop what builds on them, up to a snapshot."""
        orphans: list[int] = []
        for key in devices:
            # A snapshot sent after the write starts the device afresh; until it, or if none was
            # sent yet, its deltas build on what the outbox dropped.
            rebase = self._snapshot_ids.get(key, 0)
            if rebase <= written_up_to:
                rebase = 0
                self._unbased[key] = "full"
            orphans += [
                record_id
                for record_id, record in (*self._writing.items(), *self._puts.items())
                if record.device_key == key
                and record_id > written_up_to
                and (not rebase or record_id < rebase)
                and record.kind != Kind.OFFLINE.value
            ]
        for record_id in orphans:
            if self._puts.pop(record_id, None) is None:
                # Being written right now: deleted again by the next write (or, should that write
                # fail, not written again: it counts as acked).
                self._deletes.append(record_id)
                self._ops_ready.set()
        self._forget(set(orphans))
        self._count_unbased("full", len(orphans))
        log.warning(
            "outbox full: devices lost their newest deltas, their deltas dropped until a snapshot",
            extra={"devices": sorted(devices)[:20], "dropped": len(orphans)},
        )

    def _count_unbased(self, reason: str, count: int) -> None:
        if reason == "io":
            self._counters.dropped_io += count
        else:
            self._counters.dropped_unbased += count

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
        # A write cancelled with its loop still runs in the outbox thread: take its outcome in
        # first (failed, its events are queued again for this last flush).
        if self._write_jobs:
            await asyncio.wait(set(self._write_jobs))
            await asyncio.sleep(0)  # let their done callbacks run
        if not await self._flush() and self._puts:
            lost = len(self._puts)
            self._counters.dropped_io += lost
            log.error("outbox not writable at shutdown: events lost", extra={"events": lost})
            self._puts = {}
        try:
            await self._db(self.outbox.close)
        except Exception as exc:  # noqa: BLE001 - closing anyway
            self._outbox_failed("close", exc)

    async def _housekeeping(self, expire: bool) -> None:
        if expire:
            try:
                expired = await self._db(self.outbox.expire)
            except Exception as exc:  # noqa: BLE001 - any outbox error: logged, counted, retried
                self._outbox_failed("expiry", exc)
            else:
                if expired:
                    self._forget(set(expired))
        try:
            await self._db(self.outbox.maybe_sync)
        except Exception as exc:  # noqa: BLE001 - any outbox error: logged, counted, retried
            self._outbox_failed("checkpoint", exc)

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
                # After a failed write, the next try waits for its backoff.
                await asyncio.sleep(max(delay, self._write_retry_at - loop.time()))
                self._ops_ready.clear()
                await self._flush()
            expire = loop.time() >= next_expire
            if expire:
                next_expire = loop.time() + _EXPIRE_EVERY_S
            await self._housekeeping(expire)

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
        """Read the next events of lanes whose memory is empty: from disk, then from the write queue."""
        hungry = [lane for lane in self._lanes.values() if lane.spilled and not lane.buffer and not lane.busy]
        if not hungry:
            return
        hungry = hungry[: self.max_in_flight]
        if asyncio.get_running_loop().time() >= self._write_retry_at:
            await self._flush()  # so that the pages read below hold the events queued so far
        # Only lanes with events on disk past what left them need a read.
        wanted = [(lane.key, lane.floor) for lane in hungry if lane.stored > lane.floor]
        try:
            pages = await self._db(self._read_lanes, wanted) if wanted else {}
        except Exception as exc:  # noqa: BLE001 - any outbox error: logged, counted, retried
            self._outbox_failed("read", exc)
            return
        # From here on nothing awaits: the disk pages, the writes under way and the write queue
        # are one consistent view, in id order within each lane.
        queued: dict[str, list[OutboxRecord]] = {}
        for record in (*self._writing.values(), *self._puts.values()):
            queued.setdefault(record.lane, []).append(record)
        for lane in hungry:
            page = pages.get(lane.key, [])
            if isinstance(page, BaseException):
                self._outbox_failed("read", page)
                continue  # what is on disk comes first: wait for it
            lane.buffer.extend(_Item(record, outboxed=True) for record in page)
            if len(page) >= LANE_BUFFER:
                continue  # maybe more on disk
            # Everything on disk is read; then come the events not written yet (or whose write
            # failed: the link may be fine while the disk is not).
            after = page[-1].id if page else lane.floor
            waiting = sorted((r for r in queued.get(lane.key, ()) if r.id > after), key=lambda r: r.id)
            room = LANE_BUFFER - len(page)
            lane.buffer.extend(_Item(record, outboxed=True) for record in waiting[:room])
            lane.spilled = len(waiting) > room

    def _read_lanes(self, wanted: list[tuple[str, int]]) -> dict[str, list[OutboxRecord] | BaseException]:
        # On the outbox thread: one page per lane; a lane that cannot be read reports its error.
        pages: dict[str, list[OutboxRecord] | BaseException] = {}
        for key, floor in wanted:
            try:
                pages[key] = self.outbox.read_lane(key, floor, LANE_BUFFER)
            except Exception as exc:  # noqa: BLE001 - any outbox error: logged, counted, retried
                pages[key] = exc
        return pages

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
            # The link works: an earlier error is history, not the current state.
            self._counters.last_publish_error = None
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

    def _report_crash(self, task: asyncio.Task[None]) -> None:
        # The loops run until close() cancels them (outbox and link errors are caught inside);
        # ending any other way is a bug to shout about, and to report through `crashed`.
        if task.cancelled() or (error := task.exception()) is None:
            return
        if self._crashed is None:
            self._crashed = error
        log.critical("sender task crashed", exc_info=error, extra={"task": task.get_name()})
