"""Change detection: what drivers report becomes snapshots, deltas, ``offline`` and throttled meters.

The tracker is the :class:`~micboard.agent.drivers.base.DeviceListener` at the end of the
supervisor. It keeps, per device, the state last sent and emits:

- a full ``device`` snapshot the first time a device is read, after it comes back from
  offline or its driver restarted, and every ``snapshot_interval_s`` while it answers;
- otherwise a ``device`` delta with only the fields that changed
  (:func:`~micboard.shared.model.device_changes`), nothing when nothing changed;
- ``offline`` as soon as the driver reports the link down (drivers notice silence within
  their timeout; this adds no delay);
- ``meter`` bodies at most ``meter_rate_hz`` per channel: the latest levels win, the ones in
  between are dropped (and counted) because a level that is already stale helps nobody.

It never blocks: bodies go to the ``emit`` callbacks, which queue them for the sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from micboard.agent.drivers.base import split_reason
from micboard.shared.envelope import DeviceBody, MeterBody, OfflineBody, OfflineReason
from micboard.shared.model import ChannelMeter, Device, device_changes

log = logging.getLogger(__name__)

StateEmit = Callable[[DeviceBody | OfflineBody], None]
"""Receives each state event body, in order; must not block."""

MeterEmit = Callable[[MeterBody], None]
"""Receives each throttled meter body; must not block."""

_OFFLINE_REASONS = {"silent": OfflineReason.SILENT, "connect_failed": OfflineReason.CONNECT_FAILED}


class DeviceState(StrEnum):
    """Where a supervised device stands, as counted in heartbeats and metrics."""

    CONNECTING = "connecting"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(slots=True)
class _Tracked:
    state: DeviceState = DeviceState.CONNECTING
    sent: Device | None = None
    needs_snapshot: bool = True
    last_snapshot: float = 0.0
    last_seen_ms: int | None = None
    meter_sent: dict[int, float] = field(default_factory=dict)
    meter_pending: dict[int, ChannelMeter] = field(default_factory=dict)
    meter_timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class StateStats:
    """Counters of the tracker (exported in heartbeats and metrics)."""

    snapshots: int = 0
    deltas: int = 0
    unchanged: int = 0
    offline: int = 0
    meters_in: int = 0
    meters_out: int = 0
    meters_superseded: int = 0


class StateTracker:
    """Per-device change detection and meter throttling; implements ``DeviceListener``.

    ``clock`` is monotonic seconds (injectable for tests). Call :meth:`start` to run the
    periodic snapshots and :meth:`close` to stop them and every pending meter timer.
    """

    def __init__(
        self,
        emit: StateEmit,
        emit_meter: MeterEmit,
        *,
        snapshot_interval_s: float = 60.0,
        meter_rate_hz: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if snapshot_interval_s <= 0 or meter_rate_hz <= 0:
            raise ValueError("snapshot_interval_s and meter_rate_hz must be positive")
        self._emit = emit
        self._emit_meter = emit_meter
        self.snapshot_interval_s = snapshot_interval_s
        self.meter_interval_s = 1.0 / meter_rate_hz
        self._clock = clock
        self._devices: dict[str, _Tracked] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.stats = StateStats()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic snapshot task (in the running loop)."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="state-snapshots")

    def tasks(self) -> list[asyncio.Task[None]]:
        """The periodic snapshot task while it runs, for supervision."""
        return [self._ticker] if self._ticker is not None and not self._ticker.done() else []

    async def close(self) -> None:
        """Stop the snapshot task and drop pending meters; safe to call twice."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        for tracked in self._devices.values():
            self._cancel_meter_timer(tracked)
            tracked.meter_pending.clear()

    async def _tick_forever(self) -> None:
        # A coarse tick is enough: a snapshot a fraction of a second late changes nothing.
        period_s = min(1.0, self.snapshot_interval_s / 4)
        while True:
            await asyncio.sleep(period_s)
            self.emit_due_snapshots()

    # -- what the supervisor tells us ---------------------------------------------------

    def track(self, device_key: str) -> None:
        """A device was adopted (or its driver restarted): its next state is sent in full."""
        tracked = self._devices.setdefault(device_key, _Tracked())
        tracked.needs_snapshot = True
        if tracked.state is DeviceState.ONLINE:
            tracked.state = DeviceState.CONNECTING

    def forget(self, device_key: str) -> None:
        """A device is no longer supervised."""
        tracked = self._devices.pop(device_key, None)
        if tracked is not None:
            self._cancel_meter_timer(tracked)

    def state(self, device_key: str) -> DeviceState | None:
        """The state of ``device_key``, or ``None`` when it is not tracked."""
        tracked = self._devices.get(device_key)
        return None if tracked is None else tracked.state

    def device(self, device_key: str) -> Device | None:
        """The device state last sent for ``device_key``."""
        tracked = self._devices.get(device_key)
        return None if tracked is None else tracked.sent

    def devices_by_state(self) -> dict[str, int]:
        """How many tracked devices are in each state (every state listed, zeros included)."""
        counts = {state.value: 0 for state in DeviceState}
        for tracked in self._devices.values():
            counts[tracked.state.value] += 1
        return counts

    # -- DeviceListener -----------------------------------------------------------------

    def device_updated(self, device: Device) -> None:
        """Send a snapshot when one is due, else a delta of the changed fields (or nothing)."""
        tracked = self._devices.setdefault(device.device_key, _Tracked())
        tracked.state = DeviceState.ONLINE
        tracked.last_seen_ms = time.time_ns() // 1_000_000
        if tracked.needs_snapshot or tracked.sent is None:
            self._snapshot(device, tracked)
            return
        changes = device_changes(tracked.sent, device)
        if not changes:
            self.stats.unchanged += 1
            return
        tracked.sent = device
        self.stats.deltas += 1
        self._emit(DeviceBody(device_key=device.device_key, changes=changes))

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        """Keep the latest levels per channel; send the channels whose interval has passed."""
        tracked = self._devices.get(device_key)
        if tracked is None:
            return
        self.stats.meters_in += len(meters)
        for meter in meters:
            if meter.index in tracked.meter_pending:
                self.stats.meters_superseded += 1
            tracked.meter_pending[meter.index] = meter
        self._flush_meters(device_key, tracked)

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        """Going down publishes ``offline`` now; coming back asks for a full snapshot."""
        tracked = self._devices.setdefault(device_key, _Tracked())
        if online:
            if tracked.state is not DeviceState.ONLINE:
                tracked.needs_snapshot = True
                tracked.state = DeviceState.ONLINE
            return
        tracked.needs_snapshot = True
        self._cancel_meter_timer(tracked)
        tracked.meter_pending.clear()
        if tracked.state is DeviceState.OFFLINE:
            return
        tracked.state = DeviceState.OFFLINE
        self.stats.offline += 1
        code, said = split_reason(reason)
        known = _OFFLINE_REASONS.get(code)
        detail = said if known is not None else reason
        self._emit(
            OfflineBody(
                device_key=device_key,
                reason=known or OfflineReason.SILENT,
                detail=detail[:128] if detail else None,
                last_seen_ts=tracked.last_seen_ms,
            )
        )

    # -- snapshots ----------------------------------------------------------------------

    def emit_due_snapshots(self) -> int:
        """Send a full snapshot of every online device whose interval has passed; returns how many."""
        now = self._clock()
        sent = 0
        for tracked in self._devices.values():
            if (
                tracked.state is DeviceState.ONLINE
                and tracked.sent is not None
                and now - tracked.last_snapshot >= self.snapshot_interval_s
            ):
                self._snapshot(tracked.sent, tracked)
                sent += 1
        return sent

    def _snapshot(self, device: Device, tracked: _Tracked) -> None:
        tracked.sent = device
        tracked.needs_snapshot = False
        tracked.last_snapshot = self._clock()
        self.stats.snapshots += 1
        self._emit(DeviceBody(device_key=device.device_key, snapshot=device))

    # -- meters -------------------------------------------------------------------------

    def flush_meters(self) -> None:
        """Send every pending meter whose interval has passed (the timers call this too)."""
        for device_key, tracked in list(self._devices.items()):
            self._flush_meters(device_key, tracked)

    def _flush_meters(self, device_key: str, tracked: _Tracked) -> None:
        if not tracked.meter_pending:
            return
        now = self._clock()
        interval = self.meter_interval_s
        ready: list[ChannelMeter] = []
        next_due: float | None = None
        for index, meter in list(tracked.meter_pending.items()):
            due = tracked.meter_sent.get(index, float("-inf")) + interval
            if now >= due:
                ready.append(meter)
                tracked.meter_sent[index] = now
                del tracked.meter_pending[index]
            elif next_due is None or due < next_due:
                next_due = due
        if ready:
            self.stats.meters_out += len(ready)
            ready.sort(key=lambda m: m.index)
            self._emit_meter(MeterBody(device_key=device_key, channels=tuple(ready)))
        if next_due is not None and tracked.meter_timer is None:
            self._schedule_meter_timer(device_key, tracked, next_due - now)

    def _schedule_meter_timer(self, device_key: str, tracked: _Tracked, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous test): flush_meters() is called by hand

        def fire() -> None:
            tracked.meter_timer = None
            if self._devices.get(device_key) is tracked:
                self._flush_meters(device_key, tracked)

        tracked.meter_timer = loop.call_later(max(delay_s, 0.0), fire)

    @staticmethod
    def _cancel_meter_timer(tracked: _Tracked) -> None:
        if tracked.meter_timer is not None:
            tracked.meter_timer.cancel()
            tracked.meter_timer = None
