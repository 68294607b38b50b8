"""Battery classification as the desk reads it: bars to good / replace / critical / previously."""

from __future__ import annotations

import pytest

from micboard.collector.battery import (
    PREVIOUS_READING_WINDOW_MS,
    BatteryState,
    classify_battery,
    state_of_bars,
)

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
