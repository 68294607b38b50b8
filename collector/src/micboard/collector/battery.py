"""How a monitoring user reads a transmitter battery: good, replace, critical, or what it last was.

Bars 4-5 are good, 3 is replace, 0-2 is critical. A battery that reads unknown now (transmitter
off, or the receiver lost it) but had a valid reading within :data:`PREVIOUS_READING_WINDOW_MS`
is shown as ``previously_<state>`` rather than as an error.
"""

from __future__ import annotations

from enum import StrEnum

#: How long a past valid reading stands in for an unknown one (30 minutes).
PREVIOUS_READING_WINDOW_MS = 30 * 60 * 1000


class BatteryState(StrEnum):
    """The battery states of a channel tile, in the field's words."""

    GOOD = "good"
    REPLACE = "replace"
    CRITICAL = "critical"
    UNKNOWN = "unknown"
    PREVIOUSLY_GOOD = "previously_good"
    PREVIOUSLY_REPLACE = "previously_replace"
    PREVIOUSLY_CRITICAL = "previously_critical"


_PREVIOUSLY = {
    BatteryState.GOOD: BatteryState.PREVIOUSLY_GOOD,
    BatteryState.REPLACE: BatteryState.PREVIOUSLY_REPLACE,
    BatteryState.CRITICAL: BatteryState.PREVIOUSLY_CRITICAL,
}


def state_of_bars(bars: int | None) -> BatteryState:
    """The state of a current reading of ``bars`` (0-5, ``None`` for unknown)."""
    if bars is None or bars < 0 or bars > 5:
        return BatteryState.UNKNOWN
    if bars >= 4:
        return BatteryState.GOOD
    if bars == 3:
        return BatteryState.REPLACE
    return BatteryState.CRITICAL


def classify_battery(
    bars: int | None,
    *,
    last_bars: int | None = None,
    last_reading_ms: int | None = None,
    now_ms: int,
) -> BatteryState:
    """The state to show for ``bars`` now, given the last valid reading and when it was taken."""
    current = state_of_bars(bars)
    if current is not BatteryState.UNKNOWN:
        return current
    if last_reading_ms is None or now_ms - last_reading_ms > PREVIOUS_READING_WINDOW_MS:
        return BatteryState.UNKNOWN
    previous = state_of_bars(last_bars)
    return _PREVIOUSLY.get(previous, BatteryState.UNKNOWN)
