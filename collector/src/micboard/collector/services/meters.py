"""MeterService: what the collector does with each live meter besides showing it.

Meters arrive on core NATS through the live feed's one subscription (decoded, checked and
counted there) and are handed to :meth:`MeterService.submit`, which never blocks:

- history: every meter is folded into the channel's downsampled sample at once (in memory);
- live: every meter is offered to the :class:`LiveHub` (which never waits for a subscriber);
- alerts: RF loss and clipping are evaluated by a task owned here, latest meter per device wins.

Bound, policy, counter: at most one meter per device waits for alert evaluation; a newer one
replaces it (``stats.superseded``), so a burst costs the store one evaluation per device, not
one per message. Evaluation failures are logged and counted (``stats.failed``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from micboard.collector.live import LiveHub
from micboard.collector.runtime import cancel_all
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.history import HistoryService
from micboard.shared.envelope import MeterEvent

log = logging.getLogger(__name__)

_DeviceKey = tuple[str, str, str]  # site, agent, device_key


@dataclass(slots=True)
class MeterStats:
    """Counters of the meter service, exported as metrics."""

    received: int = 0
    evaluated: int = 0
    superseded: int = 0
    failed: int = 0


class MeterService:
    """Feeds meters to history, the live hub and the alert rules; owns the evaluation task."""

    def __init__(
        self,
        *,
        alerts: AlertService | None = None,
        history: HistoryService | None = None,
        hub: LiveHub | None = None,
    ) -> None:
        self.alerts = alerts
        self.history = history
        self.hub = hub
        self.stats = MeterStats()
        self._pending: dict[_DeviceKey, MeterEvent] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, event: MeterEvent) -> None:
        """Take one decoded meter (the live feed's meter listener); never blocks."""
        self.stats.received += 1
        body = event.body
        if self.history is not None:
            self.history.record_meter(event.site, event.agent, body)
        if self.hub is not None:
            self.hub.publish_meter(
                event.site,
                event.agent,
                body.device_key,
                {"channels": [channel.model_dump(mode="json") for channel in body.channels]},
            )
        if self.alerts is not None:
            key = (event.site, event.agent, body.device_key)
            if key in self._pending:
                self.stats.superseded += 1
            self._pending[key] = event
            self._wake.set()

    async def start(self) -> None:
        """Start the alert evaluation task (idempotent)."""
        if self._task is None and self.alerts is not None:
            self._task = asyncio.create_task(self._run(), name="meter-alerts")

    async def close(self) -> None:
        """Stop the evaluation task; meters still waiting are dropped (they are live data)."""
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
