"""SSC v1 encoding, decoding and mapping: golden tests from PROTOCOLS.md section 2 and properties."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micboard.agent.drivers.base import DeviceTarget
from micboard.agent.drivers.sennheiser.driver import SscDriver, _overlay, _without_errors
from micboard.agent.drivers.sennheiser.mapping import (
    antenna_from_divi,
    battery_bars_from_percent,
    channel_count,
    channel_from_ssc,
    channel_name_problem,
    device_from_ssc,
    meter_from_ssc,
    transmitter_from_ssc,
    warnings_from_ssc,
)
from micboard.agent.drivers.sennheiser.protocol import (
    MAX_DEPTH,
    SscError,
    SscMessage,
    SscRejected,
    SscStatus,
    cancel_subscriptions,
    channel_query,
    decode_datagram,
    encode_message,
    error_tree,
    identify_set,
    identity_query,
    liveness_query,
    mate_query,
    meter_subscription,
    mute_set,
    parse_errors,
    rename_set,
)
from micboard.shared.model import Antenna, ChannelMeter, Device, Family, Vendor


def wire(text: str) -> bytes:
    """The compact form of a JSON example, as the driver puts it on the wire."""
    return json.dumps(json.loads(text), separators=(",", ":")).encode()


def decoded(text: str | bytes) -> SscMessage:
    message = decode_datagram(text.encode() if isinstance(text, str) else text)
    assert isinstance(message, SscMessage), message
    return message


# ---- the examples of PROTOCOLS.md section 2, byte for byte ---------------------------------


def test_identity_query_is_the_documented_tree() -> None:
    expected = '{"device":{"identity":{"product":null,"serial":null,"version":null},"name":null}}'
    assert encode_message(identity_query()) == wire(expected)


def test_channel_query_is_the_documented_tree() -> None:
    expected = '{"rx1":{"name":null,"frequency":null,"mute":null,"gain":null,"warnings":null}}'
    assert encode_message(channel_query(1)) == wire(expected)


def test_mate_query_is_the_documented_tree() -> None:
    expected = (
        '{"mates":{"tx1":{"battery":{"gauge":null,"lifetime":null,"type":null},"name":null,"mute":null,'
        '"type":null,"trim":null,"warnings":null}}}'
    )
    assert encode_message(mate_query(1)) == wire(expected)


def test_sets_are_the_documented_trees() -> None:
    assert encode_message(rename_set(1, "VOX 1")) == wire('{"rx1":{"name":"VOX 1"}}')
    assert encode_message(identify_set()) == wire('{"device":{"identification":{"visual":true}}}')
    assert encode_message(mute_set(3, True)) == wire('{"rx3":{"mute":true}}')
    assert encode_message(mute_set(2, False)) == wire('{"rx2":{"mute":false}}')


def test_meter_subscription_is_the_documented_tree() -> None:
    expected = (
        '{"osc":{"state":{"subscribe":[{"#":{"lifetime":10,"min":50,"max":10000,"count":1000},'
        '"m":{"rx1":{"rssi":null,"rsqi":null,"divi":null,"af":null}}}]}}}'
    )
    tree = meter_subscription([1], lifetime_s=10, min_ms=50, max_ms=10_000, count=1000)
    assert encode_message(tree) == wire(expected)


def test_meter_subscription_keeps_a_fractional_lifetime() -> None:
    tree = meter_subscription([1, 2], lifetime_s=1.5, min_ms=100)
    params = tree["osc"]["state"]["subscribe"][0]["#"]
    assert params["lifetime"] == 1.5
    assert set(tree["osc"]["state"]["subscribe"][0]["m"]) == {"rx1", "rx2"}


def test_cancel_is_the_documented_tree() -> None:
    expected = '{"osc":{"state":{"subscribe":[{"#":{"cancel":true}}]}}}'
    assert encode_message(cancel_subscriptions()) == wire(expected)


def test_liveness_query_is_the_documented_tree() -> None:
    assert encode_message(liveness_query()) == wire('{"device":{"name":null}}')


def test_documented_error_tree_is_parsed() -> None:
    message = decoded('{"osc":{"error":[{"rx1":{"name":[{"desc":"address not found","code":404}]}}]}}')
    assert message.errors == (SscError(("rx1", "name"), 404, "address not found"),)
    assert message.tree == {}
    error = message.errors[0]
    assert error.status is SscStatus.NOT_FOUND
    assert error.address == "/rx1/name"
    assert error.within("rx1")
    assert not error.within("rx2")
    assert error.describe() == "404 not found at /rx1/name: address not found"


@pytest.mark.parametrize("code", [400, 404, 406, 409, 423, 424, 454, 500, 501])
def test_every_documented_error_code_is_typed(code: int) -> None:
    message = decoded(json.dumps({"osc": {"error": [error_tree(("mates", "tx2"), code, "why")]}}))
    assert message.errors == (SscError(("mates", "tx2"), code, "why"),)
    assert message.errors[0].status == SscStatus(code)
    assert str(code) in message.errors[0].describe()


def test_error_variant_with_code_first_is_accepted() -> None:
    message = decoded('{"osc":{"error":[{"rx1":{"name":[454,{"desc":"parameter address not found"}]}}]}}')
    assert message.errors == (SscError(("rx1", "name"), 454, "parameter address not found"),)


def test_unknown_error_code_and_root_error() -> None:
    message = decoded('{"osc":{"error":[{"desc":"bad request","code":400},{"rx9":999}]}}')
    assert message.errors == (SscError((), 400, "bad request"), SscError(("rx9",), 999, None))
    assert message.errors[1].status is None
    assert message.errors[1].describe() == "999 unknown error at /rx9"
    assert message.addresses == frozenset({"rx9"})


def test_error_parsing_ignores_junk_and_is_bounded() -> None:
    assert parse_errors("nope") == ()
    assert parse_errors([True, None, 1.5, {"desc": "only text"}]) == ()
    many = [{f"rx{i}": [{"code": 404}]} for i in range(500)]
    assert len(parse_errors(many)) == 64


def test_xid_is_echoed_and_correlated() -> None:
    data = encode_message(liveness_query(), xid=42)
    assert json.loads(data) == {"device": {"name": None}, "osc": {"xid": 42}}
    message = decoded('{"device":{"name":"EM2-1"},"osc":{"xid":42}}')
    assert message.xid == 42
    assert message.tree == {"device": {"name": "EM2-1"}}
    assert message.lookup("device", "name") == "EM2-1"
    assert message.contains("device", "name")
    assert not message.contains("device", "name", "deeper")
    assert message.lookup("device", "name", "deeper") is None
    assert message.node("device") == {"name": "EM2-1"}
    assert message.node("device", "name") is None


def test_xid_merges_into_an_existing_osc_tree() -> None:
    data = encode_message(cancel_subscriptions(), xid="abc")
    assert json.loads(data)["osc"] == {"state": {"subscribe": [{"#": {"cancel": True}}]}, "xid": "abc"}


def test_osc_keeps_other_leaves_and_drops_a_bad_xid() -> None:
    message = decoded('{"osc":{"xid":true,"state":{"subscribe":[]}}}')
    assert message.xid is None
    assert message.tree == {"osc": {"state": {"subscribe": []}}}
    assert decoded('{"osc":{"xid":"' + "x" * 65 + '"}}').xid is None
    assert decoded('{"osc":5}').tree == {"osc": 5}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b'{"rx1":{"name":', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "top level is list"),
        (b'"text"', "top level is str"),
        (b'{"m":{"rx1":{"af":NaN}}}', "not JSON"),
        (b'{"m":{"rx1":{"af":-Infinity}}}', "not JSON"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, f"nested deeper than {MAX_DEPTH}"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_datagrams_are_rejected(data: bytes, reason: str) -> None:
    result = decode_datagram(data, max_bytes=1_000_000)
    assert isinstance(result, SscRejected)
    assert result.reason.startswith(reason)


def test_huge_datagram_is_rejected_before_parsing() -> None:
    result = decode_datagram(b"{" + b" " * 70_000 + b"}")
    assert isinstance(result, SscRejected)
    assert "exceeds" in result.reason


# ---- mapping into the normalized model -----------------------------------------------------


def test_meter_maps_documented_units() -> None:
    message = decoded('{"m":{"rx1":{"rssi":-63.5,"rsqi":87,"divi":2,"af":-21.5}}}')
    meter = meter_from_ssc(1, message.lookup("m", "rx1"))
    assert meter.index == 1
    assert meter.rf_dbm == (None, -63.5)  # the one level, in the slot of the active antenna
    assert meter.link_quality_percent == 87
    assert meter.active_antenna is Antenna.B
    on_a = meter_from_ssc(1, {"rssi": -60, "rsqi": 90, "divi": 1, "af": -20})
    assert (on_a.rf_dbm, on_a.active_antenna) == ((-60.0,), Antenna.A)
    assert meter.audio_dbfs == -21.5


def test_meter_without_transmitter_and_out_of_range_values() -> None:
    meter = meter_from_ssc(2, {"rssi": -107, "rsqi": 0, "divi": 0, "af": -138.5})
    assert (meter.rf_dbm, meter.link_quality_percent, meter.active_antenna, meter.audio_dbfs) == (
        (-107.0,),
        0,
        None,
        -138.5,
    )
    junk = meter_from_ssc(2, {"rssi": "loud", "rsqi": 180, "divi": True, "af": 99})
    assert (junk.rf_dbm, junk.link_quality_percent, junk.active_antenna, junk.audio_dbfs) == (
        (),
        None,
        None,
        None,
    )
    assert meter_from_ssc(3, None).rf_dbm == ()


def test_divi_reads_as_active_antenna() -> None:
    assert [antenna_from_divi(v) for v in (0, 1, 2, 3, True, "1", None)] == [
        None,
        Antenna.A,
        Antenna.B,
        None,
        None,
        None,
        None,
    ]


def test_battery_bars_follow_the_gauge() -> None:
    assert [battery_bars_from_percent(p) for p in (None, 0, 1, 20, 21, 55, 80, 81, 100)] == [
        None,
        0,
        1,
        1,
        2,
        3,
        4,
        5,
        5,
    ]


SAMPLE_MATE: dict[str, Any] = {
    "battery": {"gauge": 70, "lifetime": 312, "type": "BA 70"},
    "name": "HH01",
    "mute": False,
    "type": "SKM",
    "trim": -6,
    "warnings": ["LowBattery"],
}


def test_transmitter_maps_battery_trim_and_mute() -> None:
    tx = transmitter_from_ssc(SAMPLE_MATE)
    assert tx is not None
    assert tx.battery_percent == 70
    assert tx.battery_bars == 4
    assert tx.runtime_min == 312
    assert tx.battery_type == "BA 70"
    assert tx.model == "SKM"
    assert tx.muted is False
    assert tx.tx_offset_db == -6
    assert transmitter_from_ssc(None) is None


def test_unknown_battery_gauge_is_none_not_zero() -> None:
    tx = transmitter_from_ssc({"battery": {"gauge": None, "lifetime": None, "type": "Battery"}})
    assert tx is not None
    assert (tx.battery_percent, tx.battery_bars, tx.runtime_min) == (None, None, None)
    assert transmitter_from_ssc({"battery": {"lifetime": -1}, "trim": 99}) == transmitter_from_ssc({})


def test_channel_maps_name_frequency_warnings_and_transmitter() -> None:
    rx = {
        "name": "HH01 Ana",
        "frequency": 470_200,
        "mute": True,
        "gain": 12,
        "warnings": ["AfPeak", "LowBattery"],
    }
    channel = channel_from_ssc(1, rx, SAMPLE_MATE)
    assert channel.name == "HH01 Ana"
    assert (channel.name_id, channel.name_person) == ("HH01", "Ana")
    assert channel.frequency_khz == 470_200
    assert channel.muted is True
    assert channel.audio_gain_db == 12
    assert channel.warnings == ("AfPeak", "LowBattery")
    assert channel.transmitter is not None
    assert channel.transmitter.battery_percent == 70


def test_channel_without_transmitter_or_readings() -> None:
    channel = channel_from_ssc(4, None, None)
    assert channel.index == 4
    assert channel.name is None
    assert channel.transmitter is None
    assert channel.warnings == ()


def test_text_values_are_bounded_and_encodable() -> None:
    channel = channel_from_ssc(1, {"name": "x" * 500, "warnings": ["\ud800", 5, "", "A" * 300]}, None)
    assert channel.name == "x" * 128
    assert channel.warnings == ("?", "A" * 128)
    assert warnings_from_ssc([f"W{i}" for i in range(40)], "nope") == tuple(f"W{i}" for i in range(16))


def test_device_maps_identity() -> None:
    message = decoded(
        '{"device":{"identity":{"product":"EW-DX EM 4","serial":"1234567890","version":"3.3.1"},'
        '"name":"RACK-A"}}'
    )
    channel = channel_from_ssc(1, {"name": "VOX 1"}, None)
    device = device_from_ssc(
        device_key="ssc:1234567890",
        family=Family.EWDX,
        address="127.0.0.1",
        port=45,
        identity=message.lookup("device", "identity"),
        name=message.lookup("device", "name"),
        channels=[channel],
    )
    assert device.vendor is Vendor.SENNHEISER
    assert (device.model, device.serial, device.device_id, device.firmware) == (
        "EW-DX EM 4",
        "1234567890",
        "1234567890",
        "3.3.1",
    )
    assert device.name == "RACK-A"
    assert device.port == 45
    assert device.channel(1) == channel
    unknown = device_from_ssc(
        device_key="k", family=Family.D6000, address="h", port=70_000, identity=7, name=None, channels=[]
    )
    assert (unknown.model, unknown.port, unknown.name) == (None, None, None)


@pytest.mark.parametrize(
    ("family", "product", "count"),
    [
        (Family.EWDX, "EW-DX EM 2", 2),
        (Family.EWDX, "EW-DX EM 2 Dante", 2),
        (Family.EWDX, "EW-DX EM 4", 4),
        (Family.EWDX, "EW-DX EM4 Dante", 4),
        (Family.EWDX, None, 2),
        (Family.D6000, "EM 6000", 2),
        (Family.D6000, "EM 6000 Dante", 2),
    ],
)
def test_channel_count_from_product(family: Family, product: str | None, count: int) -> None:
    assert channel_count(family, product) == count


@pytest.mark.parametrize(
    ("name", "family", "problem"),
    [
        ("VOX 1", Family.EWDX, None),
        ("HH01", Family.D6000, None),
        ("12345678", Family.EWDX, None),
        ("123456789", Family.EWDX, "names are at most 8 characters on ewdx"),
        ("   ", Family.EWDX, "blank"),
        ("Zoë", Family.EWDX, "printable ASCII"),
        ("A\tB", Family.EWDX, "printable ASCII"),
        ("HH_01", Family.D6000, "EM 6000 refuses: _"),
        ("HH_01", Family.EWDX, None),
        ("a.b?", Family.D6000, "EM 6000 refuses: .?"),
    ],
)
def test_channel_name_rules(name: str, family: Family, problem: str | None) -> None:
    found = channel_name_problem(name, family)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


# ---- properties: nothing a device can send makes the code raise -----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
ssc_keys = st.sampled_from(
    [
        "rx1",
        "rx2",
        "m",
        "mates",
        "tx1",
        "osc",
        "xid",
        "error",
        "code",
        "desc",
        "battery",
        "gauge",
        "lifetime",
        "rssi",
        "rsqi",
        "divi",
        "af",
        "name",
        "warnings",
        "trim",
    ]
)
ssc_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(ssc_keys, children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = decode_datagram(data)
    assert isinstance(result, SscMessage | SscRejected)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_never_raises(value: Any) -> None:
    result = decode_datagram(json.dumps(value).encode())
    assert isinstance(result, SscMessage | SscRejected)
    if isinstance(result, SscMessage):
        assert isinstance(result.errors, tuple)
        encode_message(result.tree, xid=result.xid)


@settings(max_examples=300, deadline=None)
@given(ssc_trees, ssc_trees)
def test_mapping_arbitrary_values_never_raises(first: Any, second: Any) -> None:
    meter_from_ssc(1, first)
    channel_from_ssc(2, first, second)
    transmitter_from_ssc(second)
    parse_errors(first)
    decoded_tree = decode_datagram(
        json.dumps({"osc": {"error": first, "xid": second}, "m": first}, allow_nan=True).encode()
    )
    assert isinstance(decoded_tree, SscMessage | SscRejected)


def test_a_reply_without_its_errored_leaves_over_what_was_known() -> None:
    reply = SscMessage(
        {"mates": {"tx1": {"battery": {"gauge": None, "lifetime": 300}, "trim": None, "name": "A"}}},
        errors=(
            SscError(("mates", "tx1", "battery", "gauge"), 454),
            SscError(("mates", "tx1", "trim"), 423),
            SscError(("mates", "tx1", "name", "deeper"), 454),  # below a leaf: nothing to drop
            SscError(("mates", "tx1", "gone", "x"), 454),  # under a node the reply lacks
            SscError(("mates", "tx1"), 500),  # about the whole node: its leaves still came
            SscError(("rx1", "gain"), 454),  # another address
        ),
    )
    node = reply.node("mates", "tx1")
    assert node is not None
    kept = _without_errors(node, reply, ("mates", "tx1"))
    assert kept == {"battery": {"lifetime": 300}, "name": "A"}
    assert reply.tree["mates"]["tx1"]["battery"] == {"gauge": None, "lifetime": 300}  # not mutated
    known = {"battery": {"gauge": 80, "lifetime": 310, "type": "Battery"}, "trim": 3, "name": "B"}
    assert _overlay(known, kept) == {
        "battery": {"gauge": 80, "lifetime": 300, "type": "Battery"},
        "trim": 3,
        "name": "A",
    }
    assert _overlay(None, kept) is kept
    clean = SscMessage({"rx1": {"name": "A"}})
    assert _without_errors({"name": "A"}, clean, ("rx1",)) == {"name": "A"}


class _Listener:
    """Keeps what a driver reports; the property below only needs it not to be called wrongly."""

    def __init__(self) -> None:
        self.meters: list[ChannelMeter] = []

    def device_updated(self, device: Device) -> None:
        """Not expected from datagrams alone."""

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        self.meters.extend(meters)

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        """Not expected from datagrams alone."""


def _online_driver() -> tuple[SscDriver, _Listener]:
    # What a session leaves behind once a 4-channel receiver was read: the datagram handler
    # then takes meters as well as answers.
    listener = _Listener()
    driver = SscDriver(DeviceTarget("127.0.0.1", 45, Family.EWDX, "ewdx-prop"), listener)
    driver._online = True
    driver._channel_count = 4
    return driver, listener


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=256) | ssc_trees.map(lambda t: json.dumps({"m": t}).encode()), max_size=8))
def test_the_drivers_datagram_handler_takes_anything_and_counts_it(datagrams: list[bytes]) -> None:
    """Whatever arrives on the driver's socket (junk, any tree under ``m``) is counted, never raised."""
    driver, listener = _online_driver()
    for data in datagrams:
        driver._on_datagram(data)
    # Each datagram is a message or a rejected one (a message may count a bad meter tree as well).
    assert driver.stats.messages <= len(datagrams) <= driver.stats.messages + driver.stats.parse_errors
    assert all(1 <= meter.index <= 4 for meter in listener.meters)
