"""What ingest derives from a batch's state changes without reading the store: models and readings."""

from __future__ import annotations

import itertools
from typing import Any

from micboard.collector.ingest import DeviceModels, _battery_readings
from micboard.collector.services.sync import DeviceChange
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor


def state(*percents: int | None) -> dict[str, Any]:
    channels = tuple(
        ReceiverChannel(
            index=i,
            name=f"HH0{i}",
            transmitter=None if p is None else Transmitter(model="ULXD2", battery_percent=p, battery_bars=3),
        )
        for i, p in enumerate(percents, start=1)
    )
    device = Device(device_key="rx-1", vendor=Vendor.SHURE, family=Family.ULXD, channels=channels)
    return device.model_dump(mode="json")


def delta(before: dict[str, Any], index: int, **tx: Any) -> dict[str, Any]:
    """``before`` with one channel's transmitter changed, copied the way the sync path copies."""
    channels = list(before["channels"])
    position = index - 1
    channels[position] = {**channels[position], "transmitter": {**channels[position]["transmitter"], **tx}}
    return {**before, "channels": channels}


def change(
    before: dict[str, Any] | None, after: dict[str, Any], status_before: str | None = "online"
) -> DeviceChange:
    return DeviceChange("venue", "pi-1", "rx-1", before, after, status_before, "online")


def test_readings_are_those_of_the_channels_a_change_wrote() -> None:
    first = state(80, 60, None)
    assert _battery_readings(None, first) == [(1, 80, 3), (2, 60, 3)]
    second = delta(first, 2, battery_percent=55)
    assert _battery_readings(first, second) == [(2, 55, 3)]
    assert _battery_readings(second, {**second, "name": "renamed"}) == []
    # A replaced state (a snapshot) holds new channel objects: every channel is read again.
    assert _battery_readings(second, state(80, 55, None)) == [(1, 80, 3), (2, 55, 3)]


def test_models_equal_whole_validation_along_a_chain_of_changes() -> None:
    models = DeviceModels(limit=2)
    states = [state(80, 60, 40)]
    states.append(delta(states[-1], 1, battery_percent=70))
    states.append(delta(states[-1], 3, battery_percent=10, muted=True))
    states.append({**delta(states[-1], 2, battery_percent=50), "name": "stage left"})
    states.append(state(20, 20))  # a snapshot with a channel fewer
    transitions = [models.transition(change(None, states[0], None))]
    transitions += [models.transition(change(b, a)) for b, a in itertools.pairwise(states)]
    for transition, (before, after) in zip(
        transitions, zip([None, *states], states, strict=False), strict=True
    ):
        assert transition.after == Device.model_validate(after)
        assert transition.before == (None if before is None else Device.model_validate(before))
    # An unchanged channel's model is shared with the state before, not validated again.
    assert transitions[2].after is not None and transitions[1].after is not None
    assert transitions[2].after.channels[1] is transitions[1].after.channels[1]


def test_models_are_kept_for_a_bounded_number_of_devices() -> None:
    models = DeviceModels(limit=2)
    for key in ("a", "b", "c"):
        models.transition(DeviceChange("venue", "pi-1", key, None, state(50), None, "online"))
    assert [k for _agent, k in models._by_key] == ["b", "c"]
