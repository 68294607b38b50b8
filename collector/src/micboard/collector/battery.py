"""How a monitoring user reads a transmitter battery: good, replace, critical, or what it last was.

With the default bands, bars 4-5 are good, 3 is replace, 0-2 is critical, and a percent at or
under 25 is replace, at or under 10 critical, whatever the bars say. The bands are the battery
alert thresholds (a site may override them), so a tile and an alert never disagree. A battery
that reads unknown now (transmitter off, or the receiver lost it) but had a valid reading within
:data:`PREVIOUS_READING_WINDOW_MS` is shown as ``previously_<state>`` rather than as an error.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

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


class BatteryBands(NamedTuple):
    """Where replace and critical begin: a reading at or under either bound is in that band."""

    replace_bars: int = 3
    critical_bars: int = 2
    replace_percent: int = 25
    critical_percent: int = 10


DEFAULT_BANDS = BatteryBands()


def state_of_reading(
    bars: int | None, percent: int | None = None, bands: BatteryBands = DEFAULT_BANDS
) -> BatteryState:
    """The state of a current reading (bars 0-5, percent 0-100; ``None`` or out of range: unknown).

    The same test as the battery alerts' (:meth:`AlertThresholds.battery_reading`): critical when
    either value is at or under its critical bound, else replace when either is at or under its
    replace bound.
    """
    if bars is not None and not 0 <= bars <= 5:
        bars = None
    if percent is not None and not 0 <= percent <= 100:
        percent = None
    if bars is None and percent is None:
        return BatteryState.UNKNOWN
    if (bars is not None and bars <= bands.critical_bars) or (
        percent is not None and percent <= bands.critical_percent
    ):
        return BatteryState.CRITICAL
    if (bars is not None and bars <= bands.replace_bars) or (
        percent is not None and percent <= bands.replace_percent
    ):
        return BatteryState.REPLACE
    return BatteryState.GOOD


def state_of_bars(bars: int | None, bands: BatteryBands = DEFAULT_BANDS) -> BatteryState:
    """The state of a current reading of ``bars`` alone (0-5, ``None`` for unknown)."""
    return state_of_reading(bars, None, bands)


def previously(state: BatteryState) -> BatteryState:
    """``state`` as a reading that is no longer current (``good`` -> ``previously_good``)."""
    return _PREVIOUSLY.get(state, state)


def classify_battery(
    bars: int | None,
    *,
    percent: int | None = None,
    last_bars: int | None = None,
    last_reading_ms: int | None = None,
    now_ms: int,
    bands: BatteryBands = DEFAULT_BANDS,
) -> BatteryState:
    """The state to show for a reading now, given the last valid reading (bars) and when it was taken."""
    current = state_of_reading(bars, percent, bands)
    if current is not BatteryState.UNKNOWN:
        return current
    if last_reading_ms is None or now_ms - last_reading_ms > PREVIOUS_READING_WINDOW_MS:
        return BatteryState.UNKNOWN
    return previously(state_of_bars(last_bars, bands))
