"""Durable ingest: a JetStream pull consumer whose batches are applied in one transaction each.

Guarantees, as bound / policy / counter:

- Acks are sent only after the transaction commits, so a collector that dies mid-batch loses
  nothing: un-acked events are redelivered after the ack wait and the database deduplicates them.
- Poison (undecodable, unknown version, envelope disagreeing with its subject) is terminated,
  kept in ``poison_events`` and counted by code (``IngestStats.poison_by_code``); it never blocks
  the batch.
- A batch whose transaction fails is retried event by event, so one bad event cannot block the
  others; an event that still fails on its last allowed delivery (``max_deliver``) is
  dead-lettered into ``poison_events`` (``IngestStats.dead_lettered``, and by code
  ``IngestStats.dead_lettered_by_code``). Failed events are nak'ed
  with a doubling delay.
- While the database is unreachable nothing is fetched, so an outage does not use up deliveries.
- Alert rules are evaluated inside the batch's transaction (alert rows commit with the state
  they follow, under a savepoint so that a failing evaluation cannot cost the state:
  ``IngestStats.alert_failures``); notifications, history samples and live updates go out only
  after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NotJSMessageError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy import insert, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from micboard.collector.pull import PullFetcher
from micboard.collector.services.alerts import AlertChange, AlertService, DeviceTransition
from micboard.collector.services.history import HistoryService
from micboard.collector.services.sync import (
    ApplyOutcome,
    ApplyResult,
    BatchChanges,
    DeviceChange,
    DeviceRef,
    SynchronizationService,
)
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import write_turn
from micboard.collector.store.schema import poison_events
from micboard.shared.codec import DEFAULT_MAX_BYTES, decode
from micboard.shared.envelope import AnyEvent
from micboard.shared.errors import ErrorCode, SubjectError, WireError
from micboard.shared.model import Device, ReceiverChannel
from micboard.shared.subjects import parse_subject, stream_subjects

log = logging.getLogger(__name__)

_APPLIED_KEY = ApplyOutcome.APPLIED.value

#: Codes of events set aside by ingest itself (the wire codes come from :class:`ErrorCode`).
APPLY_FAILED = "ingest.apply_failed"
DEFERRED_EXPIRED = "ingest.deferred_expired"
_MAX_DB_PROBE_DELAY_S = 5.0


@dataclass(slots=True)
class IngestStats:
    """Counters of the ingest loop, exported as metrics."""

    batches: int = 0
    events: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    poison: int = 0
    poison_by_code: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0
    isolated_events: int = 0
    retried_events: int = 0
    dead_lettered: int = 0
    dead_lettered_by_code: dict[str, int] = field(default_factory=dict)
    database_outages: int = 0
    fetch_errors: int = 0
    alert_failures: int = 0
    last_batch_ms: float = 0.0
    # Wall time spent applying batches (transaction, acks, after-commit notes). Its rate is the
    # share of the time ingest is busy: near 1, it has no room left and a backlog builds.
    batch_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """What one committed transaction changed: handed to ``on_committed`` for live views."""

    events: Sequence[AnyEvent]  # the events it applied, in order
    devices: Sequence[DeviceChange]  # each device it wrote, state before and after
    restored: Sequence[DeviceRef]  # devices shown again as reported because their stale agent is back
    alerts: Sequence[AlertChange]  # alerts it opened or resolved


@dataclass(frozen=True, slots=True)
class _SetAside:
    """An event that goes to ``poison_events``: poison from the wire, or dead-lettered by ingest."""

    msg: Msg
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A fetched batch, decoded: the messages, the valid events and the poison."""

    msgs: list[Msg]
    good: list[tuple[Msg, AnyEvent]]
    poison: list[_SetAside]


def stream_config(settings: CollectorSettings) -> StreamConfig:
    """The event stream: limits retention by age and bytes, deduplicating by Msg-Id."""
    return StreamConfig(
        name=settings.stream_name,
        subjects=stream_subjects(),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.stream_max_age_s,
        max_bytes=settings.stream_max_bytes,
        max_msg_size=settings.max_message_bytes,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.stream_replicas,
    )


def consumer_config(settings: CollectorSettings) -> ConsumerConfig:
    """The durable pull consumer every collector process shares."""
    backoff = settings.consumer_backoff_s()
    return ConsumerConfig(
        durable_name=settings.durable_name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        # With a backoff the server takes its first entry as the ack wait; say so explicitly.
        ack_wait=backoff[0],
        backoff=backoff,
        max_deliver=settings.max_deliver,
        max_ack_pending=max(settings.batch_size * 8, 1024),
    )


async def ensure_stream(js: JetStreamContext, settings: CollectorSettings) -> None:
    """Create or update the stream and the durable consumer; safe to run at every start."""
    config = stream_config(settings)
    try:
        info = await js.stream_info(settings.stream_name)
        # Sources are the operator's (venue leaf nodes sourcing into the central stream, see
        # docs/DEPLOYMENT.md): an update without them would cut every venue off.
        config.sources = info.config.sources
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)
    # Creating a durable that exists with another (mutable) config updates it in place.
    await js.add_consumer(settings.stream_name, consumer_config(settings))


# Every agent sends on a handful of subjects: parse each once (errors are not cached).
_parse_subject = functools.lru_cache(maxsize=65_536)(parse_subject)


def check_event(msg: Msg, max_bytes: int = DEFAULT_MAX_BYTES) -> AnyEvent:
    """Decode ``msg`` and check that its envelope agrees with the subject it arrived on.

    ``max_bytes``: the largest event accepted (``MICBOARD_MAX_MESSAGE_BYTES``, as the stream's).
    """
    event = decode(msg.data, max_bytes=max_bytes)
    try:
        subject = _parse_subject(msg.subject)
    except SubjectError as exc:
        raise WireError(ErrorCode.WIRE_INVALID, str(exc)) from None
    if (subject.site, subject.agent, subject.kind.value) != (event.site, event.agent, event.kind):
        raise WireError(
            ErrorCode.WIRE_INVALID,
            f"envelope {event.site}/{event.agent}/{event.kind} disagrees with subject {msg.subject}",
        )
    return event


def _deliveries(msg: Msg) -> int:
    return int(msg.metadata.num_delivered)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class DeviceModels:
    """Validated :class:`Device` models of the states a batch hands to alert evaluation.

    A device's state after one batch is its state before the next (committed states are never
    mutated, see :mod:`~micboard.collector.services.sync`), and a delta changes a channel or two:
    a model is kept per device while its state object is the one it was built from, and the model
    after a change reuses the unchanged channels' models. Validation of a whole device was the
    largest cost of evaluating alerts per event.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._by_key: dict[tuple[str, str], tuple[dict[str, Any], Device]] = {}

    def transition(self, change: DeviceChange) -> DeviceTransition:
        """The change as alert rules see it: models of the state before and after."""
        key = (change.agent, change.device_key)
        kept = self._by_key.get(key)
        before: Device | None = None
        if change.before is not None and kept is not None and kept[0] is change.before:
            before = kept[1]
            after = _derived(before, change.before, change.after)
        else:
            # Either way one device is validated whole: the other shares its unchanged channels.
            after = Device.model_validate(change.after)
            if change.before is not None:
                before = _derived(after, change.after, change.before)
        self._keep(key, change.after, after)
        return DeviceTransition(
            change.site,
            change.agent,
            change.device_key,
            before,
            after,
            change.status_before,
            change.status_after,
        )

    def _keep(self, key: tuple[str, str], state: dict[str, Any], model: Device) -> None:
        # Holding the state keeps its id from being reused by another object while kept.
        self._by_key.pop(key, None)
        self._by_key[key] = (state, model)
        if len(self._by_key) > self.limit:
            del self._by_key[next(iter(self._by_key))]


def _derived(base: Device | None, base_state: dict[str, Any] | None, state: dict[str, Any]) -> Device:
    """``state`` validated, reusing ``base`` (the model of ``base_state``) for whatever is unchanged."""
    if base is None or base_state is None or base_state.keys() != state.keys():
        return Device.model_validate(state)
    for name, value in state.items():
        if name != "channels" and base_state[name] != value:
            return Device.model_validate(state)
    old, new = base_state["channels"], state["channels"]
    if len(old) != len(new) or len(base.channels) != len(new):
        return Device.model_validate(state)
    channels = []
    for old_channel, new_channel, model in zip(old, new, base.channels, strict=True):
        if new_channel is old_channel:
            channels.append(model)  # the sync path copies a channel before changing it
        elif new_channel["index"] != model.index:
            return Device.model_validate(state)
        else:
            channels.append(ReceiverChannel.model_validate(new_channel))
    return base.model_copy(update={"channels": tuple(channels)})


def _battery_readings(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> list[tuple[int, int | None, int | None]]:
    """The battery readings of the channels a change wrote (every channel of a new or replaced state).

    A delta of one channel leaves the others' readings as they were: sampling them again would
    only count the same reading once more, at a cost per channel of every event.
    """
    old = before["channels"] if before is not None else ()
    readings = []
    for position, channel in enumerate(after["channels"]):
        if position < len(old) and old[position] is channel:
            continue  # the sync path copies a channel before changing it: the same one is unchanged
        tx = channel.get("transmitter")
        if tx is not None:
            readings.append((channel["index"], tx.get("battery_percent"), tx.get("battery_bars")))
    return readings


class IngestConsumer:
    """Fetches batches from the durable consumer, applies them, acks after commit."""

    def __init__(
        self,
        nc: Client,
        engine: AsyncEngine,
        settings: CollectorSettings,
        sync: SynchronizationService | None = None,
        on_committed: Callable[[CommittedBatch], None] | None = None,
        *,
        alerts: AlertService | None = None,
        history: HistoryService | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.engine = engine
        self.settings = settings
        self.sync = sync or SynchronizationService()
        self.stats = IngestStats()
        # Called with the events a transaction applied, after its commit: live views learn of
        # changes only once they are durable. It must not block (it runs in the ingest loop).
        self.on_committed = on_committed
        # Device and agent alert rules run in each batch's transaction; samples after its commit.
        self.alerts = alerts
        self.history = history
        self._models = DeviceModels()
        self._fetcher: PullFetcher | None = None
        self._unsettled: list[Msg] = []  # fetched, then stopped before being applied
        self._stopping = asyncio.Event()
        self._database_down = False

    async def start(self) -> None:
        """Ensure the stream and consumer exist, keep recent device state in memory, bind to the consumer."""
        await ensure_stream(self.js, self.settings)
        started = time.perf_counter()
        try:
            async with self.engine.connect() as conn:
                warmed = await self.sync.warm(conn)
        except SQLAlchemyError as exc:
            # Only a head start: the first batches read what they need.
            log.warning("could not load device state at start", extra={"error": str(exc)[:500]})
        else:
            log.info(
                "device state loaded",
                extra={"devices": warmed, "ms": round((time.perf_counter() - started) * 1000)},
            )
        fetcher = PullFetcher(
            self.nc, self.settings.stream_name, self.settings.durable_name, on_status=self._fetch_refused
        )
        await fetcher.start()
        self._fetcher = fetcher

    def _fetch_refused(self, _status: str) -> None:
        # A pull request the server answered with an error status (consumer gone, leader
        # changing, too many pending acks): nothing was delivered, the next fetch retries.
        self.stats.fetch_errors += 1

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self._stopping.set()

    async def run(self) -> None:
        """Fetch and apply batches until :meth:`stop`.

        The next batch is fetched and decoded while the current one is written (the database
        works in its own thread or server meanwhile), and no further ahead: what arrives during
        a batch waits in the stream for the batch after, not decoded in memory. A batch that is
        not full when its turn comes is topped up with what arrived meanwhile (:meth:`_top_up`).
        """
        if self._fetcher is None:
            await self.start()
        ready: asyncio.Queue[_Decoded] = asyncio.Queue(maxsize=1)
        fetcher = asyncio.create_task(self._prefetch(ready), name="ingest-fetch")
        try:
            while not self._stopping.is_set():
                if self._database_down:
                    await self._wait_for_database()
                    continue
                try:
                    batch = await asyncio.wait_for(ready.get(), timeout=self.settings.fetch_timeout_s)
                except TimeoutError:
                    if fetcher.done():
                        fetcher.result()  # the fetcher died: raise its error to our owner
                    continue
                if len(batch.msgs) < self.settings.batch_size and not self._stopping.is_set():
                    batch = await self._top_up(batch)
                ready.task_done()  # the prefetcher may fetch the next batch now
                await self._apply_decoded(batch)
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
            # What was fetched but not applied goes back at once rather than after the ack wait.
            while not ready.empty():
                self._unsettled.extend(ready.get_nowait().msgs)
            fetcher_of_run, self._fetcher = self._fetcher, None
            if fetcher_of_run is not None:
                await fetcher_of_run.close()
                self._unsettled.extend(fetcher_of_run.take_buffered())
            unsettled, self._unsettled = self._unsettled, []
            for msg in unsettled:
                with contextlib.suppress(NatsError):
                    await msg.nak()

    async def _top_up(self, batch: _Decoded) -> _Decoded:
        # The prefetched batch holds what arrived before the batch in front of it was applied;
        # what arrived while it was would otherwise wait one more batch, decoded, in memory.
        # Applying it now takes one batch's time off the delay to live views. Under a backlog
        # the prefetched batch is full and nothing is asked for.
        assert self._fetcher is not None, "start() first"
        try:
            more = await self._fetcher.fetch_available(
                self.settings.batch_size - len(batch.msgs), self.settings.fetch_timeout_s
            )
        except (NatsError, TimeoutError) as exc:
            # The prefetched batch is applied as it is; the next fetch meets the same trouble.
            self.stats.fetch_errors += 1
            log.warning("top-up fetch failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return batch
        if not more:
            return batch
        extra = self._decode(more)
        return _Decoded(batch.msgs + extra.msgs, batch.good + extra.good, batch.poison + extra.poison)

    async def _prefetch(self, ready: asyncio.Queue[_Decoded]) -> None:
        while not self._stopping.is_set():
            if self._database_down:
                # Fetching now would only spend deliveries of events that cannot be applied.
                await asyncio.sleep(self.settings.retry_delay_s)
                continue
            # Fetch only once the batch before has been taken: a batch fetched earlier would wait
            # decoded for two batches' time, and what arrived meanwhile for one more.
            await ready.join()
            msgs = await self._fetch()
            if msgs:
                ready.put_nowait(self._decode(msgs))

    async def run_once(self) -> int:
        """Fetch one batch (waiting up to the fetch timeout) and apply it; returns its size."""
        msgs = await self._fetch()
        if msgs:
            await self.apply_batch(msgs)
        return len(msgs)

    async def _fetch(self) -> list[Msg]:
        assert self._fetcher is not None, "start() first"
        try:
            return await self._fetcher.fetch(self.settings.batch_size, self.settings.fetch_timeout_s)
        except (NatsTimeoutError, TimeoutError):
            return []
        except NatsError as exc:
            # Reconnecting, or a cluster electing a new leader: nothing was delivered, try again.
            self.stats.fetch_errors += 1
            log.warning("fetch failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.retry_delay_s)
            return []

    def _decode(self, msgs: list[Msg]) -> _Decoded:
        good: list[tuple[Msg, AnyEvent]] = []
        poison: list[_SetAside] = []
        # The stream takes events up to this size: one the stream stored is not refused here.
        max_bytes = self.settings.max_message_bytes
        for msg in msgs:
            try:
                good.append((msg, check_event(msg, max_bytes)))
            except WireError as exc:
                poison.append(_SetAside(msg, exc.code.value, exc.message))
        return _Decoded(msgs, good, poison)

    async def apply_batch(self, msgs: list[Msg]) -> None:
        """Apply ``msgs`` in one transaction, then settle each (ack, nak or term) after the commit."""
        await self._apply_decoded(self._decode(msgs))

    async def _apply_decoded(self, batch: _Decoded) -> None:
        started = time.perf_counter()
        msgs, good, poison = batch.msgs, batch.good, batch.poison
        events = [event for _msg, event in good]
        try:
            async with write_turn(self.engine), self.engine.begin() as conn:
                changes, alert_changes = await self._apply_events(conn, events)
                if poison:
                    await conn.execute(insert(poison_events), [self._set_aside_row(p) for p in poison])
        except Exception as exc:  # noqa: BLE001 - whatever broke the transaction, nothing was applied
            self.stats.failed_batches += 1
            log.warning(
                "batch transaction failed, retrying its events one by one",
                extra={"size": len(msgs), "error": f"{type(exc).__name__}: {exc}"[:500]},
            )
            await self._isolate(good, poison)
        else:
            self.sync.committed(changes)
            self._after_commit(events, changes, alert_changes)
            for item in poison:
                await self._terminate_poison(item)
            outcomes = self.stats.outcomes
            for (msg, _event), result in zip(good, changes.results, strict=True):
                if result.outcome is ApplyOutcome.APPLIED:
                    # The common case without a coroutine per event: count and ack.
                    outcomes[_APPLIED_KEY] = outcomes.get(_APPLIED_KEY, 0) + 1
                    await msg.ack()
                else:
                    await self._settle(msg, result)
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.events += len(msgs)
        self.stats.batch_seconds += elapsed
        self.stats.last_batch_ms = elapsed * 1000

    async def _isolate(self, good: list[tuple[Msg, AnyEvent]], poison: list[_SetAside]) -> None:
        """After a failed batch: apply each event in a transaction of its own."""
        if not await self._database_reachable():
            self._enter_outage()
            for msg in [m for m, _e in good] + [p.msg for p in poison]:
                await self._retry_later(msg)
            return
        if poison:
            try:
                await self._store_set_aside(poison)
            except Exception:
                # Whatever failed, terminating without the row would lose the poison: keep it.
                log.exception("could not store poison events; they are redelivered")
                for item in poison:
                    await self._retry_later(item.msg)
            else:
                for item in poison:
                    await self._terminate_poison(item)
        for index, (msg, event) in enumerate(good):
            self.stats.isolated_events += 1
            try:
                async with write_turn(self.engine), self.engine.begin() as conn:
                    changes, alert_changes = await self._apply_events(conn, [event])
            except Exception as exc:  # noqa: BLE001 - this one event is what fails; set it apart
                if not await self._database_reachable():
                    self._enter_outage()
                    for later, _event in good[index:]:
                        await self._retry_later(later)
                    return
                await self._failed_alone(msg, f"{type(exc).__name__}: {exc}"[:2000])
            else:
                self.sync.committed(changes)
                self._after_commit([event], changes, alert_changes)
                await self._settle(msg, changes.results[0])

    async def _apply_events(
        self, conn: AsyncConnection, events: list[AnyEvent]
    ) -> tuple[BatchChanges, list[AlertChange]]:
        """Apply ``events`` and evaluate the alert rules they touch, in the caller's transaction."""
        changes = await self.sync.apply_batch_changes(conn, events)
        if self.alerts is None:
            return changes, []
        # Most writes change nothing an alert rule decides on (a name, a battery percent that
        # stays clear of its thresholds): those build no model and cost no query.
        alerts = self.alerts
        moved = [
            c
            for c in changes.devices
            if alerts.needs_evaluation(c.site, c.before, c.after, c.status_before, c.status_after)
        ]
        if not moved and not changes.agents_back:
            return changes, []
        now = _now_ms()
        try:
            # A savepoint: should evaluation fail, the state is still committed and acked.
            async with conn.begin_nested():
                found = await self.alerts.evaluate_devices(
                    conn, [self._models.transition(c) for c in moved], now_ms=now
                )
                found += await self.alerts.agents_changed(conn, back=changes.agents_back, now_ms=now)
        except Exception:
            # Whatever failed (a bug, a row edited by hand), the events themselves are fine.
            self.stats.alert_failures += 1
            log.exception("alert evaluation failed; the batch is applied without it")
            return changes, []
        return changes, found

    def _after_commit(
        self, events: list[AnyEvent], changes: BatchChanges, alert_changes: list[AlertChange]
    ) -> None:
        """Tell alerts, history and live views what the committed transaction changed (never blocks)."""
        if self.alerts is not None and alert_changes:
            self.alerts.notify(alert_changes)
        if self.history is not None:
            now = _now_ms()
            for change in changes.devices:
                if change.status_after == "online":
                    self.history.record_battery(
                        change.site,
                        change.agent,
                        change.device_key,
                        _battery_readings(change.before, change.after),
                        now_ms=now,
                    )
        applied = [
            event
            for event, result in zip(events, changes.results, strict=True)
            if result.outcome is ApplyOutcome.APPLIED
        ]
        if self.on_committed is None or not (applied or changes.restored or alert_changes):
            return
        try:
            self.on_committed(CommittedBatch(applied, changes.devices, changes.restored, alert_changes))
        except Exception:
            # A failing listener must not stop ingest: the events are committed either way.
            log.exception("on_committed listener failed", extra={"events": len(applied)})

    async def _failed_alone(self, msg: Msg, reason: str) -> None:
        if _deliveries(msg) < self.settings.max_deliver:
            log.warning("event failed, retrying later", extra={"subject": msg.subject, "reason": reason})
            await self._retry_later(msg)
            return
        await self._dead_letter(_SetAside(msg, APPLY_FAILED, reason))

    async def _settle(self, msg: Msg, result: ApplyResult) -> None:
        outcome = result.outcome
        self.stats.outcomes[outcome.value] = self.stats.outcomes.get(outcome.value, 0) + 1
        if outcome is ApplyOutcome.DEFERRED:
            if _deliveries(msg) < self.settings.max_deliver:
                await self._retry_later(msg)
            else:
                await self._dead_letter(_SetAside(msg, DEFERRED_EXPIRED, result.detail or "deferred"))
            return
        if outcome is ApplyOutcome.REJECTED:
            log.warning("event rejected", extra={"subject": msg.subject, "detail": result.detail})
        await msg.ack()

    async def _retry_later(self, msg: Msg) -> None:
        self.stats.retried_events += 1
        attempt = max(_deliveries(msg), 1)
        delay = min(self.settings.retry_delay_s * 2 ** (attempt - 1), self.settings.retry_max_delay_s)
        await msg.nak(delay=delay)

    async def _dead_letter(self, item: _SetAside) -> None:
        try:
            await self._store_set_aside([item])
        except Exception:
            # Whatever failed, terminating without the row would lose the event.
            log.exception(
                "could not dead-letter an event; it is redelivered", extra={"subject": item.msg.subject[:200]}
            )
            await self._retry_later(item.msg)
            return
        self.stats.dead_lettered += 1
        by_code = self.stats.dead_lettered_by_code
        by_code[item.code] = by_code.get(item.code, 0) + 1
        log.error(
            "event dead-lettered",
            extra={"subject": item.msg.subject, "code": item.code, "reason": item.reason},
        )
        await item.msg.term()

    async def _terminate_poison(self, item: _SetAside) -> None:
        self.stats.poison += 1
        self.stats.poison_by_code[item.code] = self.stats.poison_by_code.get(item.code, 0) + 1
        log.warning(
            "poison event terminated",
            extra={"subject": item.msg.subject, "code": item.code, "reason": item.reason},
        )
        await item.msg.term()

    async def _store_set_aside(self, items: list[_SetAside]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(poison_events), [self._set_aside_row(p) for p in items])

    async def _database_reachable(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError):
            return False
        return True

    def _enter_outage(self) -> None:
        if not self._database_down:
            self.stats.database_outages += 1
            log.error("database unreachable: ingest pauses until it answers")
        self._database_down = True

    async def _wait_for_database(self) -> None:
        delay = self.settings.retry_delay_s
        while not self._stopping.is_set():
            if await self._database_reachable():
                log.info("database reachable again: ingest resumes")
                self._database_down = False
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, _MAX_DB_PROBE_DELAY_S)

    @staticmethod
    def _set_aside_row(item: _SetAside) -> dict[str, Any]:
        try:
            metadata = item.msg.metadata
            stream_seq: int | None = metadata.sequence.stream
            deliveries: int | None = metadata.num_delivered
        except NotJSMessageError:  # pragma: no cover - every message here comes from JetStream
            stream_seq = deliveries = None
        return {
            "subject": item.msg.subject[:255],
            "code": item.code,
            "reason": item.reason,
            "data": bytes(item.msg.data),
            "received_ms": time.time_ns() // 1_000_000,
            "stream_seq": stream_seq,
            "deliveries": deliveries,
        }
