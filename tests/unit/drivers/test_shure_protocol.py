"""Golden tests of the Shure command-string framing, parsing and dialects (PROTOCOLS.md section 1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micboard.agent.discovery.slp import build_attributes, found_from_attributes, parse_attributes
from micboard.agent.drivers.shure.dialects import AXIENT, QLXD, SLXD, ULXD, Dialect, dialect_for
from micboard.agent.drivers.shure.protocol import (
    FrameReader,
    Get,
    Message,
    Rep,
    RepErr,
    Sample,
    Set,
    brace,
    encode,
    parse_message,
)
from micboard.shared.model import Antenna, AntennaState, ChannelMeter, Device, Family, Vendor


def feed_one(data: bytes) -> Message:
    reader = FrameReader()
    messages = reader.feed(data)
    assert len(messages) == 1, messages
    return messages[0]


def meter_of(dialect: Dialect, line: bytes) -> ChannelMeter | None:
    message = feed_one(line)
    assert isinstance(message, Sample)
    return dialect.meter(message.channel, message.fields)


# -- SAMPLE layouts ----------------------------------------------------------------------


def test_ulxd_sample_rf_on_antenna_a_and_audio() -> None:
    meter = meter_of(ULXD, b"< SAMPLE 1 ALL AX 078 032 >")
    assert meter == ChannelMeter(
        index=1,
        rf_dbm=(-50.0, None),
        active_antenna=Antenna.A,
        antenna_states=(AntennaState.ACTIVE, AntennaState.INACTIVE),
        audio_dbfs=-18.0,
    )


def test_ulxd_sample_antenna_b_and_none_active() -> None:
    meter_b = meter_of(QLXD, b"< SAMPLE 2 ALL XB 100 050 >")
    assert meter_b is not None
    assert meter_b.rf_dbm == (None, -28.0)
    assert meter_b.active_antenna is Antenna.B
    assert meter_b.antenna_states == (AntennaState.INACTIVE, AntennaState.ACTIVE)
    assert meter_b.audio_dbfs == 0.0
    meter_x = meter_of(ULXD, b"< SAMPLE 1 ALL XX 020 000 >")
    assert meter_x is not None
    assert meter_x.rf_dbm == (None, None)
    assert meter_x.active_antenna is None
    assert meter_x.antenna_states == (AntennaState.INACTIVE, AntennaState.INACTIVE)
    assert meter_x.audio_dbfs == -50.0


def test_axient_sample_diversity() -> None:
    meter = meter_of(AXIENT, b"< SAMPLE 1 ALL 005 031 102 102 BB 31 086 31 065 >")
    assert meter == ChannelMeter(
        index=1,
        rf_dbm=(-34.0, -55.0),
        active_antenna=Antenna.A,
        antenna_states=(AntennaState.ACTIVE, AntennaState.ACTIVE),
        audio_dbfs=-18.0,
        audio_peak_dbfs=-18.0,
        link_quality_percent=100,
    )


def test_axient_sample_transmitter_off() -> None:
    meter = meter_of(AXIENT, b"< SAMPLE 1 ALL 255 000 005 033 XX 00 011 00 012 >")
    assert meter is not None
    assert meter.link_quality_percent is None
    assert meter.active_antenna is None
    assert meter.antenna_states == (AntennaState.INACTIVE, AntennaState.INACTIVE)
    assert meter.rf_dbm == (-109.0, -108.0)
    assert meter.audio_peak_dbfs == -115.0
    assert meter.audio_dbfs == -87.0


def test_axient_sample_quadversity() -> None:
    meter = meter_of(AXIENT, b"< SAMPLE 3 ALL 004 031 100 090 BRXB 31 080 05 030 00 010 31 090 >")
    assert meter is not None
    assert meter.rf_dbm == (-40.0, -90.0, -110.0, -30.0)
    assert meter.active_antenna is Antenna.D
    # The receiver's own verdict per antenna, red included, as its front panel shows it.
    assert meter.antenna_states == (
        AntennaState.ACTIVE,
        AntennaState.RED,
        AntennaState.INACTIVE,
        AntennaState.ACTIVE,
    )
    assert meter.link_quality_percent == 80


def test_axient_sample_unknown_antenna_state_is_left_unknown() -> None:
    meter = meter_of(AXIENT, b"< SAMPLE 1 ALL 005 031 102 102 BQ 31 086 31 065 >")
    assert meter is not None
    assert meter.rf_dbm == (-34.0, -55.0)  # the levels still count
    assert meter.antenna_states == ()


def test_slxd_sample() -> None:
    meter = meter_of(SLXD, b"< SAMPLE 1 ALL 102 102 086 >")
    assert meter == ChannelMeter(index=1, rf_dbm=(-34.0,), audio_dbfs=-18.0, audio_peak_dbfs=-18.0)
    assert meter.antenna_states == ()  # SLX-D says nothing of its antennas


@pytest.mark.parametrize(
    ("dialect", "fields"),
    [
        (ULXD, ("AX", "078")),
        (ULXD, ("AXB", "078", "032")),
        (ULXD, ("AX", "1x8", "032")),
        (ULXD, ("AX", "200", "032")),
        (AXIENT, ("005", "031", "102", "102", "BB", "31", "086", "31")),
        (AXIENT, ("005", "031", "102", "102", "BBB", "31", "086", "31", "065", "1", "2")),
        (AXIENT, ("005", "031", "10x", "102", "BB", "31", "086", "31", "065")),
        (AXIENT, ("005", "031", "999", "102", "BB", "31", "086", "31", "065")),
        (SLXD, ("102", "102")),
        (SLXD, ("102", "102", "-86")),
        (SLXD, ("102", "abc", "086")),
    ],
)
def test_samples_that_do_not_fit_the_layout_are_none(dialect: Dialect, fields: tuple[str, ...]) -> None:
    assert dialect.meter(1, fields) is None


def test_sample_of_a_channel_out_of_range_is_none() -> None:
    assert ULXD.meter(0, ("AX", "078", "032")) is None
    assert SLXD.meter(65, ("102", "102", "086")) is None
    assert AXIENT.meter(99, ("005", "031", "102", "102", "BB", "31", "086", "31", "065")) is None


# -- REP and commands --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"< REP 1 CHAN_NAME {Vox 1   } >", Rep(1, "CHAN_NAME", None, "Vox 1   ")),
        (
            b"< REP 2 CHAN_NAME {HH01 Fatai                     } >",
            Rep(2, "CHAN_NAME", None, "HH01 Fatai                     "),
        ),
        (b"< REP 1 RSSI 2 012 >", Rep(1, "RSSI", 2, "012")),
        (b"< REP 1 SLOT_BATT_BARS 8 255 >", Rep(1, "SLOT_BATT_BARS", 8, "255")),
        (b"< REP 1 SLOT_STATUS 2 LINKED.ACTIVE >", Rep(1, "SLOT_STATUS", 2, "LINKED.ACTIVE")),
        (b"< REP 1 SLOT_TX_MODEL 1 {SLXD1+    } >", Rep(1, "SLOT_TX_MODEL", 1, "SLXD1+    ")),
        (b"< REP 1 LINK_STATUS 1 online >", Rep(1, "LINK_STATUS", 1, "online")),
        (b"< REP 1 GROUP_CHANNEL {--,--} >", Rep(1, "GROUP_CHANNEL", None, "--,--")),
        (b"< REP DEVICE_ID {Rack 3  } >", Rep(None, "DEVICE_ID", None, "Rack 3  ")),
        (b"< REP FLASH ON >", Rep(None, "FLASH", None, "ON")),
        (b"< REP 1 METER_RATE 00100 >", Rep(1, "METER_RATE", None, "00100")),
        (b"< REP ERR >", RepErr()),
        (b"< GET 0 ALL >", Get(0, "ALL", None)),
        (b"< GET DEVICE_ID >", Get(None, "DEVICE_ID", None)),
        (b"< GET 1 RSSI 2 >", Get(1, "RSSI", 2)),
        (b"< SET 1 METER_RATE 00100 >", Set(1, "METER_RATE", None, "00100")),
        (b"< SET 1 CHAN_NAME {Vox 1   } >", Set(1, "CHAN_NAME", None, "Vox 1   ")),
        (b"< SET FLASH ON >", Set(None, "FLASH", None, "ON")),
    ],
)
def test_golden_messages(line: bytes, expected: Message) -> None:
    assert feed_one(line) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "REP",
        "REP 1",
        "HELLO 1 X",
        "SAMPLE X ALL 1 2",
        "SAMPLE 1 SOME 1 2",
        "SAMPLE 1 ALL",
        "REP 1 CHAN_NAME {unterminated",
        "REP 1 CHAN_NAME {a} trailing",
        "REP 1 {x}",
        "REP 1234567 X 1",
        "REP 1 X",
        "REP 1 X a b c",
        "REP 1 X y 2",
        "GET 1 X 2 3",
        "GET 1 X y",
        "SET 1 X",
        "SET 1 X 1 2 3",
    ],
)
def test_malformed_messages_are_none(text: str) -> None:
    assert parse_message(text) is None


def test_encode_is_the_wire_form() -> None:
    assert encode(Sample(1, ("AX", "078", "032"))) == b"< SAMPLE 1 ALL AX 078 032 >"
    assert encode(RepErr()) == b"< REP ERR >"
    assert encode(Get(0, "ALL", None)) == b"< GET 0 ALL >"
    assert encode(Get(None, "DEVICE_ID", None)) == b"< GET DEVICE_ID >"
    assert encode(Set(1, "METER_RATE", None, "00100")) == b"< SET 1 METER_RATE 00100 >"
    assert encode(Rep(1, "RSSI", 2, "012")) == b"< REP 1 RSSI 2 012 >"
    assert encode(Rep(1, "CHAN_NAME", None, brace("Vox 1", 8))) == b"< REP 1 CHAN_NAME {Vox 1   } >"


# -- dialect state mapping ---------------------------------------------------------------


def test_format_value_widths_and_digits() -> None:
    assert ULXD.format_value("CHAN_NAME", "Vox 1") == "{Vox 1   }"
    assert AXIENT.format_value("CHAN_NAME", "Vox 1") == "{Vox 1" + " " * 26 + "}"
    assert SLXD.format_value("MODEL", "SLXD4D") == "{SLXD4D" + " " * 26 + "}"
    assert AXIENT.format_value("FW_VER", "1.6.11.0") == "{1.6.11.0" + " " * 16 + "}"
    assert ULXD.format_value("FREQUENCY", 578350) == "578350"
    assert AXIENT.format_value("FREQUENCY", 594075) == "0594075"
    assert ULXD.format_value("METER_RATE", 100) == "00100"
    assert ULXD.format_value("ENCRYPTION", "ON") == "ON"


def test_ulxd_channel_state() -> None:
    raw = {
        "CHAN_NAME": "HH01 Ana",
        "FREQUENCY": "578350",
        "GROUP_CHAN": "01,02",
        "AUDIO_GAIN": "030",
        "AUDIO_MUTE": "ON",
        "RF_INT_DET": "CRITICAL",
        "TX_TYPE": "ULXD2",
        "TX_OFFSET": "003",
        "TX_RF_PWR": "HIGH",
        "TX_MUTE_STATUS": "OFF",
        "TX_PWR_LOCK": "ON",
        "TX_MENU_LOCK": "OFF",
        "BATT_BARS": "004",
        "BATT_CHARGE": "077",
        "BATT_CYCLE": "00042",
        "BATT_RUN_TIME": "00312",
        "BATT_TYPE": "LION",
        "BATT_TEMP_C": "031",
    }
    channel = ULXD.channel(1, raw, {"ENCRYPTION": "ON"})
    assert channel.name == "HH01 Ana"
    assert channel.name_id == "HH01"
    assert channel.frequency_khz == 578350
    assert channel.group_channel == "01,02"
    assert channel.audio_gain_db == 12
    assert channel.muted is True
    assert channel.interference is True
    assert channel.encrypted is True
    assert channel.warnings == ("interference",)
    tx = channel.transmitter
    assert tx is not None
    assert (tx.model, tx.battery_bars, tx.battery_percent, tx.runtime_min) == ("ULXD2", 4, 77, 312)
    assert (tx.battery_cycles, tx.battery_type, tx.battery_temp_c) == (42, "LION", 31)
    assert (tx.tx_offset_db, tx.rf_power, tx.muted, tx.locked) == (3, "HIGH", False, "POWER")


def test_name_padding_is_stripped() -> None:
    message = feed_one(b"< REP 1 CHAN_NAME {Vox 1   } >")
    assert isinstance(message, Rep)
    assert ULXD.channel(1, {"CHAN_NAME": message.value}, {}).name == "Vox 1"


@pytest.mark.parametrize("minutes", ["65535", "65534", "65533"])
def test_ulxd_sentinels_read_as_unknown(minutes: str) -> None:
    raw = {
        "TX_TYPE": "UNKN",
        "BATT_BARS": "255",
        "BATT_CHARGE": "255",
        "BATT_CYCLE": "65535",
        "BATT_RUN_TIME": minutes,
        "BATT_TYPE": "UNKN",
        "BATT_TEMP_C": "255",
        "TX_OFFSET": "255",
        "TX_RF_PWR": "UNKN",
        "TX_MUTE_STATUS": "UNKN",
        "TX_PWR_LOCK": "UNKN",
        "TX_MENU_LOCK": "UNKN",
        "GROUP_CHAN": "--,--",
        "FREQUENCY": "000000",
    }
    channel = ULXD.channel(1, raw, {})
    assert channel.transmitter is None
    assert channel.group_channel is None
    assert channel.frequency_khz is None
    assert ("tx_communication" in channel.warnings) == (minutes == "65533")


def test_ulxd_lock_combinations() -> None:
    def lock(power: str, menu: str) -> str | None:
        tx = ULXD.transmitter({"TX_TYPE": "ULXD1", "TX_PWR_LOCK": power, "TX_MENU_LOCK": menu})
        assert tx is not None
        return tx.locked

    assert lock("ON", "ON") == "ALL"
    assert lock("OFF", "ON") == "MENU"
    assert lock("OFF", "OFF") == "NONE"
    assert lock("UNKN", "UNKN") is None


def test_axient_channel_state_offsets_and_warnings() -> None:
    raw = {
        "CHAN_NAME": "Lead Vocal" + " " * 21,
        "FREQUENCY": "0594075",
        "GROUP_CHANNEL": "--,--",
        "AUDIO_GAIN": "000",
        "AUDIO_MUTE": "OFF",
        "INTERFERENCE_STATUS": "NONE",
        "ENCRYPTION_STATUS": "ERROR",
        "UNREGISTERED_TX_STATUS": "UNREGISTERED",
        "TX_MODEL": "ADX2",
        "TX_BATT_BARS": "003",
        "TX_BATT_CHARGE_PERCENT": "055",
        "TX_BATT_CYCLE_COUNT": "00017",
        "TX_BATT_HEALTH_PERCENT": "099",
        "TX_BATT_MINS": "00120",
        "TX_BATT_TYPE": "LION",
        "TX_POWER_LEVEL": "010",
        "TX_MUTE_MODE_STATUS": "OFF",
        "TX_LOCK": "MENU",
        "TX_OFFSET": "000",
        "CHAN_QUALITY": "255",
    }
    channel = AXIENT.channel(2, raw, {"ENCRYPTION_MODE": "AUTO"})
    assert channel.name == "Lead Vocal"
    assert channel.frequency_khz == 594075
    assert channel.group_channel is None
    assert channel.audio_gain_db == -18
    assert channel.muted is False
    assert channel.interference is False
    assert channel.encrypted is True
    assert channel.warnings == ("encryption", "unregistered_tx")
    tx = channel.transmitter
    assert tx is not None
    assert (tx.model, tx.battery_bars, tx.battery_percent, tx.runtime_min) == ("ADX2", 3, 55, 120)
    assert (tx.battery_cycles, tx.battery_health_percent, tx.rf_power, tx.locked) == (17, 99, "10 mW", "MENU")
    assert tx.tx_offset_db == -12
    assert AXIENT.channel(2, {**raw, "TX_OFFSET": "032"}, {}).transmitter.tx_offset_db == 20  # type: ignore[union-attr]
    assert AXIENT.channel(2, {**raw, "TX_OFFSET": "255"}, {}).transmitter.tx_offset_db is None  # type: ignore[union-attr]
    assert AXIENT.channel(2, {**raw, "INTERFERENCE_STATUS": "DETECTED"}, {}).interference is True
    off = AXIENT.channel(2, {"TX_MODEL": "UNKNOWN", "TX_BATT_BARS": "255", "TX_BATT_MINS": "65535"}, {})
    assert off.transmitter is None
    assert off.interference is None
    assert off.encrypted is None


def test_slxd_has_no_mute_and_model_is_reported() -> None:
    channel = SLXD.channel(1, {"AUDIO_MUTE": "ON", "TX_MODEL": "SLXD2", "TX_BATT_BARS": "005"}, {})
    assert channel.muted is None
    assert channel.transmitter is not None
    assert channel.transmitter.battery_bars == 5
    assert SLXD.device_model({"MODEL": "SLXD4D" + " " * 26}, 2) == "SLXD4D"
    assert ULXD.device_model({}, 4) == "ULXD4Q"
    assert QLXD.device_model({}, 1) == "QLXD4"
    assert dialect_for(Family.AXIENT) is AXIENT
    assert dialect_for(Family.EWDX) is None


def test_garbage_values_read_as_unknown() -> None:
    raw = {"AUDIO_GAIN": "x", "FREQUENCY": "-1", "TX_TYPE": "ULXD1", "BATT_BARS": "9"}
    channel = ULXD.channel(1, raw, {})
    assert channel.audio_gain_db is None
    assert channel.frequency_khz is None
    assert channel.transmitter is not None
    assert channel.transmitter.battery_bars is None


# -- values longer than the model holds ---------------------------------------------------

DIALECTS = [ULXD, QLXD, AXIENT, SLXD]
# What a REP can carry after framing: printable ASCII without the framing characters.
_WIRE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="<>{}")
_WIRE_VALUE = st.one_of(st.text(_WIRE_CHARS, max_size=12), st.text(_WIRE_CHARS, min_size=129, max_size=400))


def _device_of(dialect: Dialect, raw: dict[str, str], device_raw: dict[str, str]) -> Device:
    """The device as the driver builds it from a channel's and the device's REP values."""
    return Device(
        device_key="rack-1",
        vendor=Vendor.SHURE,
        family=dialect.family,
        model=dialect.device_model(device_raw, 1),
        channels=(dialect.channel(1, raw, device_raw),),
    )


def _text_params(dialect: Dialect) -> list[str]:
    tx = dialect.tx
    return sorted({*dialect.channel_params, dialect.group_param, *(p for p in tx if p is not None)})


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.family.value)
def test_values_over_128_characters_are_cut_not_fatal(dialect: Dialect) -> None:
    # MODEL, TX_MODEL / TX_TYPE, GROUP_CHAN, BATT_TYPE are free text to the model (128 at most).
    tx = dialect.tx
    long = {name: name[:2] + "X" * 300 for name in (tx.model, dialect.group_param, tx.battery_type) if name}
    device = _device_of(dialect, {"CHAN_NAME": "Vox", **long}, {"MODEL": "M" * 300})
    assert device.model == "M" * 128
    channel = device.channels[0]
    assert channel.group_channel == dialect.group_param[:2] + "X" * 126
    assert channel.transmitter is not None
    assert channel.transmitter.model == tx.model[:2] + "X" * 126
    if tx.battery_type is not None:
        assert channel.transmitter.battery_type == tx.battery_type[:2] + "X" * 126


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(DIALECTS), st.data())
def test_whatever_a_receiver_reports_the_device_still_builds(dialect: Dialect, data: st.DataObject) -> None:
    raw = {param: data.draw(_WIRE_VALUE, label=param) for param in _text_params(dialect)}
    device_raw = {
        param: data.draw(_WIRE_VALUE, label=f"device {param}")
        for param in sorted({"MODEL", *dialect.device_params})
    }
    device = _device_of(dialect, raw, device_raw)
    assert device.channel_count == 1


def test_a_long_slp_user_name_or_model_is_cut_to_what_the_model_holds() -> None:
    attributes = parse_attributes(
        build_attributes(
            "00000000-0000-0000-0000-000000000000",
            cid="12345678-1234-1234-1234-123456789012",
            address="192.0.2.7",
            model="ULXD4Q " + "Q" * 300,
            name="Stage left " + "L" * 300,
        )
    )
    found = found_from_attributes(attributes, "192.0.2.7")
    assert found is not None
    assert found.name == ("Stage left " + "L" * 300)[:128]
    assert found.model == ("ULXD4Q " + "Q" * 300)[:128]
    # Adopted under that name, the device's snapshot (name is 128 characters at most) builds.
    Device(device_key="k", vendor=Vendor.SHURE, family=Family.ULXD, name=found.name, model=found.model)


# -- framing -----------------------------------------------------------------------------

STREAM = (
    b"< REP 1 CHAN_NAME {Vox 1   } >< REP 1 BATT_BARS 004 >< SAMPLE 1 ALL AX 078 032 >"
    b"< REP ERR >< REP 1 RSSI 2 012 >< SAMPLE 1 ALL 005 031 102 102 BB 31 086 31 065 >"
    b"< REP 1 SLOT_TX_MODEL 1 {SLXD1+    } >< SAMPLE 2 ALL 102 102 086 >< REP FLASH ON >"
)
STREAM_MESSAGES = 9


def test_many_messages_per_read_and_cut_across_reads() -> None:
    whole = FrameReader().feed(STREAM)
    assert len(whole) == STREAM_MESSAGES
    reader = FrameReader()
    pieces = [STREAM[i : i + 7] for i in range(0, len(STREAM), 7)]
    assert [m for piece in pieces for m in reader.feed(piece)] == whole
    assert reader.pending_bytes == 0
    assert reader.messages == STREAM_MESSAGES
    assert reader.parse_errors == 0


def test_junk_is_counted_and_skipped() -> None:
    reader = FrameReader()
    out = reader.feed(b"\x00\xffjunk>< REP 1 BATT_BARS 004 >zz< REP 2 BATT_BARS 003 >< \xc3\xa9 >< BOGUS >")
    assert out == [Rep(1, "BATT_BARS", None, "004"), Rep(2, "BATT_BARS", None, "003")]
    assert reader.parse_errors == 3
    assert reader.dropped_bytes > 0


def test_a_megabyte_line_is_dropped_and_the_stream_goes_on() -> None:
    reader = FrameReader(max_line_bytes=1024)
    assert reader.feed(b"< REP 1 CHAN_NAME {" + b"x" * (1024 * 1024)) == []
    assert reader.pending_bytes == 0
    assert reader.feed(b"y" * 5000) == []
    assert reader.pending_bytes == 0
    assert reader.feed(b"} >< REP 1 BATT_BARS 004 >") == [Rep(1, "BATT_BARS", None, "004")]
    assert reader.parse_errors == 1
    assert reader.dropped_bytes > 1024 * 1024
    # A long line arriving whole in one read is dropped too.
    assert reader.feed(b"< REP 1 X " + b"z" * 4096 + b" >< REP ERR >") == [RepErr()]
    assert reader.parse_errors == 2


def test_a_message_right_after_a_dropped_line_survives() -> None:
    reader = FrameReader(max_line_bytes=100)
    assert reader.feed(b"x" * 500) == []
    assert reader.feed(b"x" * 50 + b"< REP 1 BATT_BARS 004 >") == [Rep(1, "BATT_BARS", None, "004")]
    assert reader.parse_errors == 1
    assert reader.dropped_bytes == 550


def test_reset_forgets_a_partial_message() -> None:
    reader = FrameReader()
    assert reader.feed(b"< REP 1 BATT_") == []
    reader.reset()
    assert reader.feed(b"< REP ERR >") == [RepErr()]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0, max_value=2048), max_size=8))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(max_line_bytes=256)
    points = sorted({min(c, len(data)) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        for message in reader.feed(data[start:point]):
            if isinstance(message, Sample):
                for dialect in (ULXD, AXIENT, SLXD):
                    dialect.meter(message.channel, message.fields)
        start = point
    assert reader.pending_bytes <= 256


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=10), st.binary(max_size=64))
def test_any_split_of_a_valid_stream_yields_the_same_messages(cuts: list[int], prefix_junk: bytes) -> None:
    expected = FrameReader().feed(STREAM)
    reader = FrameReader()
    data = STREAM
    got: list[Message] = []
    start = 0
    for point in [*sorted(set(cuts)), len(data)]:
        got.extend(reader.feed(data[start:point]))
        start = point
    assert got == expected
    # Junk without a '<' in front of a stream costs no message.
    assert FrameReader().feed(prefix_junk.replace(b"<", b"") + STREAM) == expected
