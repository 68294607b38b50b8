"""Durable ingest: a JetStream pull consumer whose batches are applied in one transaction each.

Acks are sent only after the transaction commits, so a collector that dies mid-batch loses
nothing: the un-acked events are redelivered and the database deduplicates them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.services.sync import ApplyOutcome, SynchronizationService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.schema import poison_events
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent
from micboard.shared.errors import ErrorCode, SubjectError, WireError
from micboard.shared.subjects import parse_subject, stream_subjects

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IngestStats:
    """Counters of the ingest loop, exported as metrics."""

    batches: int = 0
    events: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    poison: int = 0
    poison_by_code: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0
    last_batch_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class _Poison:
    msg: Msg
    code: str
    reason: str


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
    return ConsumerConfig(
        durable_name=settings.durable_name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=max(settings.batch_size * 8, 1024),
    )


async def ensure_stream(js: JetStreamContext, settings: CollectorSettings) -> None:
    """Create or update the stream and the durable consumer; safe to run at every start."""
    config = stream_config(settings)
    try:
        await js.stream_info(settings.stream_name)
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)
    await js.add_consumer(settings.stream_name, consumer_config(settings))


def check_event(msg: Msg) -> AnyEvent:
    """Decode ``msg`` and check that its envelope agrees with the subject it arrived on."""
    event = decode(msg.data)
    try:
        subject = parse_subject(msg.subject)
    except SubjectError as exc:
        raise WireError(ErrorCode.WIRE_INVALID, str(exc)) from None
    if (subject.site, subject.agent, subject.kind.value) != (event.site, event.agent, event.kind):
        raise WireError(
            ErrorCode.WIRE_INVALID,
            f"envelope {event.site}/{event.agent}/{event.kind} disagrees with subject {msg.subject}",
        )
    return event


class IngestConsumer:
    """Fetches batches from the durable consumer, applies them, acks after commit."""

    def __init__(
        self,
        nc: Client,
        engine: AsyncEngine,
        settings: CollectorSettings,
        sync: SynchronizationService | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.engine = engine
        self.settings = settings
        self.sync = sync or SynchronizationService()
        self.stats = IngestStats()
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Ensure the stream and consumer exist and bind to the consumer."""
        await ensure_stream(self.js, self.settings)
        self._sub = await self.js.pull_subscribe_bind(
            self.settings.durable_name, stream=self.settings.stream_name
        )

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self._stopping.set()

    async def run(self) -> None:
        """Fetch and apply batches until :meth:`stop`."""
        if self._sub is None:
            await self.start()
        while not self._stopping.is_set():
            await self.run_once()

    async def run_once(self) -> int:
        """Fetch one batch (waiting up to the fetch timeout) and apply it; returns its size."""
        assert self._sub is not None, "start() first"
        try:
            msgs = await self._sub.fetch(self.settings.batch_size, timeout=self.settings.fetch_timeout_s)
        except (NatsTimeoutError, TimeoutError):
            return 0
        await self.apply_batch(msgs)
        return len(msgs)

    async def apply_batch(self, msgs: list[Msg]) -> None:
        """Apply ``msgs`` in one transaction, then ack them; poison is terminated and kept aside."""
        started = time.perf_counter()
        good: list[tuple[Msg, AnyEvent]] = []
        poison: list[_Poison] = []
        for msg in msgs:
            try:
                good.append((msg, check_event(msg)))
            except WireError as exc:
                poison.append(_Poison(msg, exc.code.value, exc.message))
        try:
            async with self.engine.begin() as conn:
                for msg, event in good:
                    result = await self.sync.apply(conn, event)
                    self._count(result.outcome, msg, result.detail)
                if poison:
                    await conn.execute(insert(poison_events), [self._poison_row(p) for p in poison])
        except Exception:
            # The transaction rolled back: nothing of this batch is applied, so nothing is acked
            # and JetStream redelivers it after the ack wait. Logged with the cause, then go on.
            self.stats.failed_batches += 1
            log.exception("batch failed, leaving it for redelivery", extra={"size": len(msgs)})
            for msg in msgs:
                await msg.nak(delay=1.0)
            return
        for msg, _event in good:
            await msg.ack()
        for item in poison:
            self.stats.poison += 1
            self.stats.poison_by_code[item.code] = self.stats.poison_by_code.get(item.code, 0) + 1
            log.warning(
                "poison event terminated",
                extra={"subject": item.msg.subject, "code": item.code, "reason": item.reason},
            )
            await item.msg.term()
        self.stats.batches += 1
        self.stats.events += len(msgs)
        self.stats.last_batch_ms = (time.perf_counter() - started) * 1000

    def _count(self, outcome: ApplyOutcome, msg: Msg, detail: str | None) -> None:
        self.stats.outcomes[outcome.value] = self.stats.outcomes.get(outcome.value, 0) + 1
        if outcome is ApplyOutcome.REJECTED:
            log.warning("event rejected", extra={"subject": msg.subject, "detail": detail})

    @staticmethod
    def _poison_row(item: _Poison) -> dict[str, Any]:
        return {
            "subject": item.msg.subject[:255],
            "code": item.code,
            "reason": item.reason,
            "data": bytes(item.msg.data),
            "received_ms": time.time_ns() // 1_000_000,
        }
