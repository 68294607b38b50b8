"""Battery classification as the desk reads it: bars to good / replace / critical / previously."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from micboard.collector.battery import (
    PREVIOUS_READING_WINDOW_MS,
    BatteryBands,
    BatteryState,
    classify_battery,
    previously,
    state_of_bars,
    state_of_reading,
)
from micboard.collector.services.alerts import AlertRule, AlertThresholds

NOW = 1_700_000_000_000


@pytest.mark.parametrize(
    ("bars", "state"),
    [
        (5, BatteryState.GOOD),
        (4, BatteryState.GOOD),
        (3, BatteryState.REPLACE),
        (2, BatteryState.CRITICAL),
        (1, BatteryState.CRITICAL),
        (0, BatteryState.CRITICAL),
        (None, BatteryState.UNKNOWN),
        (6, BatteryState.UNKNOWN),
        (-1, BatteryState.UNKNOWN),
    ],
)
def test_bars_map_to_states(bars: int | None, state: BatteryState) -> None:
    assert state_of_bars(bars) is state
    assert classify_battery(bars, now_ms=NOW) is state


def test_a_current_reading_wins_over_the_last_one() -> None:
    assert classify_battery(2, last_bars=5, last_reading_ms=NOW, now_ms=NOW) is BatteryState.CRITICAL


@pytest.mark.parametrize(
    ("last_bars", "state"),
    [
        (5, BatteryState.PREVIOUSLY_GOOD),
        (3, BatteryState.PREVIOUSLY_REPLACE),
        (1, BatteryState.PREVIOUSLY_CRITICAL),
        (None, BatteryState.UNKNOWN),
    ],
)
def test_unknown_with_a_recent_reading_is_previously(last_bars: int | None, state: BatteryState) -> None:
    assert classify_battery(None, last_bars=last_bars, last_reading_ms=NOW - 60_000, now_ms=NOW) is state


def test_a_reading_older_than_the_window_is_forgotten() -> None:
    edge = NOW - PREVIOUS_READING_WINDOW_MS
    assert (
        classify_battery(None, last_bars=5, last_reading_ms=edge, now_ms=NOW) is BatteryState.PREVIOUSLY_GOOD
    )
    assert classify_battery(None, last_bars=5, last_reading_ms=edge - 1, now_ms=NOW) is BatteryState.UNKNOWN
    assert classify_battery(None, last_bars=5, last_reading_ms=None, now_ms=NOW) is BatteryState.UNKNOWN


_bars = st.none() | st.integers(0, 5)
_percent = st.none() | st.integers(0, 100)


@st.composite
def _thresholds(draw: st.DrawFn) -> AlertThresholds:
    critical_bars = draw(st.integers(0, 5))
    critical_percent = draw(st.integers(0, 100))
    return AlertThresholds(
        battery_critical_bars=critical_bars,
        battery_replace_bars=draw(st.integers(critical_bars, 5)),
        battery_critical_percent=critical_percent,
        battery_replace_percent=draw(st.integers(critical_percent, 100)),
    )


@given(_bars, _percent, _thresholds())
def test_a_tile_reads_a_battery_as_its_alerts_do(
    bars: int | None, percent: int | None, rules: AlertThresholds
) -> None:
    """The tile's state and the battery alerts come from one test: they never disagree."""
    state = state_of_reading(bars, percent, rules.bands)
    low = rules.battery_reading(AlertRule.BATTERY_LOW, bars, percent)
    critical = rules.battery_reading(AlertRule.BATTERY_CRITICAL, bars, percent)
    assert (state is BatteryState.UNKNOWN) == (bars is None and percent is None)
    assert (state is BatteryState.CRITICAL) == (critical is True)
    assert (state in (BatteryState.REPLACE, BatteryState.CRITICAL)) == (low is True)


def test_percent_counts_as_the_alerts_count_it() -> None:
    assert state_of_reading(4, 20) is BatteryState.REPLACE  # 25 % and under: replace, whatever the bars
    assert state_of_reading(5, 9) is BatteryState.CRITICAL
    assert state_of_reading(None, 60) is BatteryState.GOOD  # a transmitter reporting percent alone
    assert state_of_reading(9, None) is BatteryState.UNKNOWN  # out of range reads as unknown
    assert state_of_reading(3, None, BatteryBands(replace_bars=2, critical_bars=1)) is BatteryState.GOOD


def test_a_reading_no_longer_current_reads_as_previously_known() -> None:
    assert previously(BatteryState.GOOD) is BatteryState.PREVIOUSLY_GOOD
    assert previously(BatteryState.CRITICAL) is BatteryState.PREVIOUSLY_CRITICAL
    assert previously(BatteryState.PREVIOUSLY_REPLACE) is BatteryState.PREVIOUSLY_REPLACE
    assert previously(BatteryState.UNKNOWN) is BatteryState.UNKNOWN
