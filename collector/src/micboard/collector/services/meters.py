"""MeterService: what the collector records of each live meter (history and alert rules).

Meters arrive on core NATS, and what is done with them depends on what needs to see them all:

- alerts: RF loss ("no usable RF for N s") keeps a timer per channel in memory, so the rules must
  see every reading of a channel. Each ingesting process evaluates every meter (the live feed's
  one subscription decodes it and hands it to :meth:`MeterService.submit`); the database keeps
  one open alert per rule and target whichever process opens it. A task owned here evaluates,
  latest meter per device wins.
- history: a channel's downsampled sample must count each reading once, so it is recorded by
  ONE ingesting process: this service subscribes in the queue group :data:`METER_QUEUE`, NATS
  hands each meter to one member, and the member folds it into the channel's sample in memory.
  Such a meter is decoded and checked (:func:`decode_meter`; a bad one is counted in
  ``stats.bad``).

Bound, policy, counter: at most one meter per device waits for alert evaluation; a newer one
replaces it (``stats.superseded``), so a burst costs the store one evaluation per device, not
one per message. Evaluation failures, and meters that could not be recorded, are logged and
counted (``stats.failed``). Nothing here blocks the NATS client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from micboard.collector.runtime import cancel_all
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.history import HistoryService
from micboard.shared.codec import decode
from micboard.shared.envelope import MeterEvent
from micboard.shared.errors import WireError
from micboard.shared.subjects import SUBJECT_PREFIX, Kind

log = logging.getLogger(__name__)

METER_QUEUE = "micboard-collector-meters"
"""The queue group of the processes that record meters in history: each meter goes to one of them."""

METER_SUBJECTS = f"{SUBJECT_PREFIX}.*.*.{Kind.METER.value}"
"""Every agent's meters."""

_DeviceKey = tuple[str, str, str]  # site, agent, device_key
_DECODED_KEPT = 256


@functools.lru_cache(maxsize=_DECODED_KEPT)
def decode_meter(subject: str, data: bytes) -> MeterEvent | None:
    """The meter event in ``data``, or None for bytes that are not one.

    None for undecodable bytes, another kind of event, or a meter whose site and agent disagree
    with the subject it arrived on (an agent may only speak for itself).

    An ingesting process receives each meter twice, on the live feed's subscription and on its
    history share, one right after the other: the last few results are kept (events are frozen),
    so the second delivery costs a lookup instead of a decode.
    """
    try:
        event = decode(data)
    except WireError:
        return None
    if not isinstance(event, MeterEvent) or not subject.endswith(
        f".{event.site}.{event.agent}.{Kind.METER.value}"
    ):
        return None
    return event


@dataclass(slots=True)
class MeterStats:
    """Counters of the meter service, exported as metrics."""

    received: int = 0  # submitted for alert evaluation (every meter, in each ingesting process)
    recorded: int = 0  # folded into history (this process's share of the queue group)
    bad: int = 0  # of the share: undecodable, or site/agent disagreeing with the subject
    evaluated: int = 0
    superseded: int = 0
    failed: int = 0


class MeterService:
    """Feeds meters to the alert rules and history; owns the history share and the evaluation task."""

    def __init__(
        self,
        *,
        alerts: AlertService | None = None,
        history: HistoryService | None = None,
    ) -> None:
        self.alerts = alerts
        self.history = history
        self.stats = MeterStats()
        self._pending: dict[_DeviceKey, MeterEvent] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None

    def submit(self, event: MeterEvent) -> None:
        """Take one decoded meter for the alert rules (every meter of the fleet); never blocks."""
        self.stats.received += 1
        if self.alerts is not None:
            key = (event.site, event.agent, event.body.device_key)
            if key in self._pending:
                self.stats.superseded += 1
            self._pending[key] = event
            self._wake.set()

    def record(self, event: MeterEvent) -> None:
        """Fold one decoded meter into history (this process's share); never blocks."""
        if self.history is not None:
            self.history.record_meter(event.site, event.agent, event.body)
            self.stats.recorded += 1

    async def start(self, nc: Client | None = None) -> None:
        """Start the alert evaluation task and, given a connection, take a share of history.

        Idempotent. The subscription joins :data:`METER_QUEUE`: with several collectors on one
        NATS, each meter is recorded in history by exactly one of them.
        """
        if self._task is None and self.alerts is not None:
            self._task = asyncio.create_task(self._run(), name="meter-alerts")
        if nc is not None and self.history is not None and self._sub is None:
            self._sub = await nc.subscribe(METER_SUBJECTS, queue=METER_QUEUE, cb=self._on_share)

    async def _on_share(self, msg: Msg) -> None:
        event = decode_meter(msg.subject, msg.data)
        if event is None:
            self.stats.bad += 1
            return
        try:
            self.record(event)
        except Exception:
            # One meter that could not be recorded must not stop the next ones.
            self.stats.failed += 1
            log.exception("meter not recorded", extra={"agent": event.agent})

    async def close(self) -> None:
        """Leave the queue group and stop the evaluation task; waiting meters are dropped (live data)."""
        if self._sub is not None:
            with contextlib.suppress(NatsError, OSError):
                await self._sub.unsubscribe()
            self._sub = None
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        self._pending.clear()

    async def _run(self) -> None:
        assert self.alerts is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for event in pending.values():
                try:
                    await self.alerts.evaluate_meter(event.site, event.agent, event.body)
                except Exception:
                    # The store may be briefly away; the next meter of the device tries again.
                    self.stats.failed += 1
                    log.exception("meter alert evaluation failed", extra={"agent": event.agent})
                else:
                    self.stats.evaluated += 1
