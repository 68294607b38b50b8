"""The msgpack codec: round trips of every kind, and only WireError for bad input."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micboard.shared import SCHEMA_VERSION
from micboard.shared.codec import DEFAULT_MAX_BYTES, decode, decode_command_result, decode_model, encode
from micboard.shared.envelope import (
    AnyEvent,
    CommandAction,
    CommandBody,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    DeviceBody,
    DeviceEvent,
    DiscoveredBody,
    DiscoveredEvent,
    HeartbeatBody,
    HeartbeatEvent,
    HelloBody,
    HelloEvent,
    MeterBody,
    MeterEvent,
    OfflineBody,
    OfflineEvent,
)
from micboard.shared.errors import ErrorCode, WireError
from micboard.shared.model import (
    ChannelMeter,
    Device,
    Family,
    ReceiverChannel,
    Transmitter,
    Vendor,
    apply_changes,
    device_changes,
)

BASE: dict[str, Any] = {
    "site": "venue-1",
    "agent": "pi-01",
    "boot": "b00t",
    "seq": 7,
    "ts": 1_700_000_000_000,
}


def make_device(name: str = "HH01 Fatai", bars: int | None = 4) -> Device:
    channel = ReceiverChannel(
        index=1,
        name=name,
        frequency_khz=578_350,
        transmitter=Transmitter(model="ULXD2", battery_bars=bars, battery_percent=80, runtime_min=300),
    )
    return Device(
        device_key="shure-a1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4",
        channels=(channel, ReceiverChannel(index=2)),
    )


def every_kind() -> list[AnyEvent]:
    device = make_device()
    return [
        HelloEvent(**BASE, body=HelloBody(version="26.11.28", hostname="pi", config={"devices": 2})),
        HeartbeatEvent(**BASE, body=HeartbeatBody(uptime_s=12.5, devices_by_state={"online": 2}, dropped=1)),
        DeviceEvent(**BASE, body=DeviceBody(device_key="shure-a1", snapshot=device)),
        DeviceEvent(**BASE, body=DeviceBody(device_key="shure-a1", changes={"channels": {1: {"name": "X"}}})),
        OfflineEvent(**BASE, body=OfflineBody(device_key="shure-a1", detail="no bytes for 5 s")),
        DiscoveredEvent(**BASE, body=DiscoveredBody(source="mdns", address="127.0.0.1", port=2202)),
        MeterEvent(
            **{**BASE, "seq": 0},
            body=MeterBody(
                device_key="shure-a1",
                channels=(
                    ChannelMeter(
                        index=1,
                        rf_dbm=(-50.0, -95.0),
                        active_antenna="A",
                        antenna_states=("active", "red"),
                        audio_dbfs=-18.0,
                    ),
                ),
            ),
        ),
        CommandEvent(
            **{**BASE, "seq": 0},
            body=CommandBody(
                request_id="r1", action=CommandAction.RENAME, device_key="shure-a1", channel=1, value="HH02"
            ),
        ),
    ]


@pytest.mark.parametrize("event", every_kind(), ids=lambda e: f"{e.kind}")
def test_round_trip_of_every_kind(event: AnyEvent) -> None:
    data = encode(event)
    assert isinstance(data, bytes)
    decoded = decode(data)
    assert decoded == event
    assert type(decoded) is type(event)


def test_envelope_version_is_the_schema_version() -> None:
    assert every_kind()[0].v == SCHEMA_VERSION
    raw = msgpack.unpackb(encode(every_kind()[0]))
    assert raw["v"] == 1 and raw["kind"] == "hello"


def test_command_result_round_trip() -> None:
    result = CommandResult(request_id="r1", outcome=CommandOutcome.NOT_SUPPORTED, detail="no mute on SLX-D")
    assert decode_command_result(encode(result)) == result
    with pytest.raises(WireError) as info:
        decode_model(msgpack.packb({"request_id": "r1", "outcome": "maybe"}), CommandResult)
    assert info.value.code is ErrorCode.WIRE_INVALID


def test_delta_survives_the_wire_and_applies() -> None:
    old, new = make_device(), make_device(name="HH01 Ines", bars=2)
    changes = device_changes(old, new)
    event = DeviceEvent(**BASE, body=DeviceBody(device_key="shure-a1", changes=changes))
    decoded = decode(encode(event))
    assert isinstance(decoded, DeviceEvent) and decoded.body.changes is not None
    assert apply_changes(old, decoded.body.changes) == new


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda d: d.update(v=2), ErrorCode.WIRE_UNKNOWN_VERSION),
        (lambda d: d.update(v=True), ErrorCode.WIRE_UNKNOWN_VERSION),
        (lambda d: d.update(v=1.0), ErrorCode.WIRE_UNKNOWN_VERSION),
        (lambda d: d.update(site=b"hall"), ErrorCode.WIRE_INVALID),  # msgpack bin, not str
        (lambda d: d.update(boot=b"b00t"), ErrorCode.WIRE_INVALID),
        (lambda d: d["body"]["snapshot"].update(model=b"ULXD4"), ErrorCode.WIRE_INVALID),
        (lambda d: d.pop("v"), ErrorCode.WIRE_UNKNOWN_VERSION),
        (lambda d: d.update(kind="telepathy"), ErrorCode.WIRE_INVALID),
        (lambda d: d.update(site="Bad Site"), ErrorCode.WIRE_INVALID),
        (lambda d: d.update(seq=-1), ErrorCode.WIRE_INVALID),
        (lambda d: d.update(seq="7"), ErrorCode.WIRE_INVALID),
        (lambda d: d.update(extra=1), ErrorCode.WIRE_INVALID),
        (lambda d: d["body"].update(snapshot=None), ErrorCode.WIRE_INVALID),
        (lambda d: d["body"].update(changes={"channels": {1: {"name": "x"}}}), ErrorCode.WIRE_INVALID),
        (lambda d: d["body"].update(device_key="other"), ErrorCode.WIRE_INVALID),
    ],
)
def test_invalid_envelopes_raise_wire_error(mutate: Any, code: ErrorCode) -> None:
    raw = msgpack.unpackb(encode(every_kind()[2]), strict_map_key=False)
    mutate(raw)
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(raw))
    assert info.value.code is code
    assert str(info.value).startswith(f"[{code.value}]")


@pytest.mark.parametrize(
    "changes",
    [
        {"bogus": 1},
        {"model": 5},
        {"channels": [1, 2]},
        {"channels": {0: {"name": "x"}}},
        {"channels": {True: {"name": "x"}}},
        {"channels": {1: "x"}},
        {"channels": {1: {"index": 2}}},
        {"channels": {1: {"frequency_khz": -1}}},
        {"channels": {1: {"transmitter": {"battery_bars": 9}}}},
        {"channels": {1: {"wat": 1}}},
        {"name": b"HH01"},  # bytes would reach the collector's stored state and break its write
        {"channels": {1: {"warnings": [b"rf"]}}},
        {"channels": {1: {"transmitter": {"model": b"ULXD2"}}}},
    ],
)
def test_invalid_deltas_are_refused(changes: dict[str, Any]) -> None:
    raw = msgpack.unpackb(encode(every_kind()[3]), strict_map_key=False)
    raw["body"]["changes"] = changes
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(raw, use_bin_type=True))
    assert info.value.code is ErrorCode.WIRE_INVALID


def test_a_bad_delta_value_is_named_by_its_place() -> None:
    raw = msgpack.unpackb(encode(every_kind()[3]), strict_map_key=False)
    raw["body"]["changes"] = {"channels": {1: {"warnings": ["ok", b"rf"]}}}
    with pytest.raises(WireError, match=r"channels\.1\.warnings\.1: Input should be a valid string"):
        decode(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    ("kind", "place"),
    [
        ("meter", lambda body, n: body["channels"][0].update(audio_dbfs=n)),
        ("meter", lambda body, n: body["channels"][0].update(rf_dbm=[n, -90.0])),
        ("heartbeat", lambda body, n: body.update(interval_s=n)),
        ("heartbeat", lambda body, n: body.update(uptime_s=n)),
        ("hello", lambda body, n: body["config"].update(ratio=n)),
    ],
)
def test_numbers_that_are_no_reading_are_refused(kind: str, place: Any, number: float) -> None:
    """NaN and infinities: a heartbeat interval of inf would keep its agent from ever going stale."""
    event = next(e for e in every_kind() if e.kind == kind)
    raw = msgpack.unpackb(encode(event), strict_map_key=False)
    place(raw["body"], number)
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(raw))
    assert info.value.code is ErrorCode.WIRE_INVALID


@pytest.mark.parametrize(
    "states",
    [["active", "purple"], ["active"] * 5, "active", [1]],
    ids=["unknown-state", "more-than-four", "not-a-list", "not-text"],
)
def test_invalid_antenna_states_are_refused(states: Any) -> None:
    meter = next(e for e in every_kind() if isinstance(e, MeterEvent))
    raw = msgpack.unpackb(encode(meter), strict_map_key=False)
    raw["body"]["channels"][0]["antenna_states"] = states
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(raw))
    assert info.value.code is ErrorCode.WIRE_INVALID


def test_garbage_and_size_limits() -> None:
    with pytest.raises(WireError) as info:
        decode(b"\xc1")
    assert info.value.code is ErrorCode.WIRE_GARBAGE
    with pytest.raises(WireError) as info:
        decode(msgpack.packb([1, 2]))
    assert info.value.code is ErrorCode.WIRE_GARBAGE
    with pytest.raises(WireError) as info:
        decode("text")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.WIRE_GARBAGE
    with pytest.raises(WireError) as info:
        decode(b"\x80" * (DEFAULT_MAX_BYTES + 1))
    assert info.value.code is ErrorCode.WIRE_TOO_LARGE
    big = HelloEvent(**BASE, body=HelloBody(version="x" * 2000))
    with pytest.raises(WireError) as info:
        encode(big, max_bytes=1024)
    assert info.value.code is ErrorCode.WIRE_TOO_LARGE
    assert decode(encode(big), max_bytes=4096) == big


def test_ten_thousand_random_byte_strings_only_raise_wire_error() -> None:
    rng = random.Random(20261128)
    outcomes: dict[str, int] = {}
    for _ in range(10_000):
        data = rng.randbytes(rng.randint(0, 64))
        try:
            decode(data)
            outcomes["decoded"] = outcomes.get("decoded", 0) + 1
        except WireError as exc:
            outcomes[exc.code.value] = outcomes.get(exc.code.value, 0) + 1
    assert sum(outcomes.values()) == 10_000
    assert outcomes.get("decoded", 0) == 0
    assert outcomes[ErrorCode.WIRE_GARBAGE.value] > 0


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-3, 70), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = ["v", "kind", "site", "agent", "boot", "seq", "ts", "body"]


@st.composite
def malformed_envelopes(draw: st.DrawFn) -> bytes:
    """Valid envelopes with fields removed, replaced by arbitrary values, or extra keys added."""
    event = draw(st.sampled_from(every_kind()))
    raw: dict[Any, Any] = msgpack.unpackb(encode(event), strict_map_key=False)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "replace", "add", "body"]))
        if action == "drop":
            raw.pop(draw(st.sampled_from(_FIELDS)), None)
        elif action == "replace":
            raw[draw(st.sampled_from(_FIELDS))] = draw(_values)
        elif action == "add":
            raw[draw(st.text(max_size=6))] = draw(_values)
        elif isinstance(raw.get("body"), dict) and raw["body"]:
            key = draw(st.sampled_from(sorted(raw["body"], key=str)))
            raw["body"][key] = draw(_values)
    return bytes(msgpack.packb(raw, use_bin_type=True))


# 10,000 examples take a while under coverage on a busy machine: a generous, bounded timeout.
@pytest.mark.timeout(900)
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_envelopes())
def test_malformed_envelopes_only_raise_wire_error(data: bytes) -> None:
    try:
        event = decode(data)
    except WireError as exc:
        assert exc.code in set(ErrorCode)
        return
    # A mutation can leave a valid event (e.g. an optional field set to a valid value).
    assert decode(encode(event)) == event


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        decode(data)
