"""SLPv2 packets and the DCID / model tables: round trips, real captures, junk never raises."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micboard.agent.discovery.dcid import (
    SHURE_DCIDS,
    default_port,
    family_for_model,
    is_shure_dcid,
    lookup_dcid,
    normalize_dcid,
    vendor_for_family,
    vendor_for_model,
)
from micboard.agent.discovery.slp import (
    CONTROL_PORT_TAG,
    FLAG_REQUEST_MCAST,
    FunctionId,
    SlpAnnouncer,
    SlpDecodeError,
    SlpListener,
    SlpMessage,
    build_attributes,
    dcid_from_attributes,
    decode_message,
    decode_message_strict,
    encode_message,
    found_from_attributes,
    parse_attributes,
)
from micboard.agent.drivers.simulation import Announcement
from micboard.shared.errors import ConfigError
from micboard.shared.model import Family, Vendor

AD4Q = "042D5A00-FD5A-11E3-A553-0015C5F3F612"
CID = "DD47E0D7-0000-11DD-A000-000EDDCCCCCC"

# An SLXD4DE announcement as captured from hardware (header, error code, attribute list).
CAPTURED_SLXD = (
    b'\x02\x07\x00\x01P\x00\x00\x00\x00\x00"=\x00\x02en\x00\x00\x01;'
    b"(cid=DDB0C8C5-0000-11DD-A000-000EDDCCCCCC),"
    b"(acn-fctn=SLXD4DE_RX),"
    b"(acn-uacn=SLXD4DE G57),"
    b"(acn-services=esta.dmp),"
    b"(csl-esta.dmp=esta.sdt/192.168.3.21:57383;esta.dmp/cd:320CA2FC-2932-11ED-8BBF-0015C5F3F612),"
    b"(device-description=$:tftp://192.168.3.21/$.ddl),"
    b"(csl-esta.dmp.values=version:1_interfaceId:65552_extVersion:1)."
)


@pytest.mark.parametrize(
    "message",
    [
        SlpMessage(FunctionId.ATTR_RPLY, xid=0x223D, attributes=f"(cid={CID}),(csl-esta.dmp=cd:{AD4Q})"),
        SlpMessage(FunctionId.ATTR_RPLY, xid=7, error_code=3, language="de"),
        SlpMessage(
            FunctionId.SRV_RQST,
            xid=65535,
            flags=FLAG_REQUEST_MCAST,
            prlist="10.0.0.1",
            service_type="service:acn.esta",
            scopes="ACN-DEFAULT",
            predicate="(acn-fctn=AD4Q)",
        ),
        SlpMessage(
            FunctionId.ATTR_RQST, xid=1, url="service:acn.esta:///" + CID, scopes="ACN-DEFAULT", tags="cid"
        ),
        SlpMessage(
            FunctionId.SA_ADVERT, url="service:directory-agent://x", scopes="DEFAULT", attributes="(a=1)"
        ),
        SlpMessage(
            FunctionId.SRV_REG,
            url="service:acn.esta:///" + CID,
            lifetime=300,
            service_type="service:acn.esta",
            scopes="ACN-DEFAULT",
            attributes="(acn-fctn=ULXD4Q)",
        ),
    ],
)
def test_encode_decode_round_trip(message: SlpMessage) -> None:
    data = encode_message(message)
    assert data[0] == 2 and data[1] == message.function
    assert int.from_bytes(data[2:5], "big") == len(data)
    assert decode_message(data) == message


def test_encode_refuses_functions_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="SRV_ACK"):
        encode_message(SlpMessage(FunctionId.SRV_ACK))
    with pytest.raises(ValueError, match="65535"):
        encode_message(SlpMessage(FunctionId.ATTR_RPLY, attributes="x" * 70_000))


def test_header_only_functions_decode() -> None:
    header = struct.pack(">BB3sH3sHH", 2, FunctionId.SRV_ACK, (16).to_bytes(3, "big"), 0, b"\0\0\0", 9, 2)
    assert decode_message(header + b"en") == SlpMessage(FunctionId.SRV_ACK, xid=9)


def test_captured_announcement_parses() -> None:
    message = decode_message_strict(CAPTURED_SLXD)
    assert message.function is FunctionId.ATTR_RPLY
    assert message.xid == 0x223D
    attributes = parse_attributes(message.attributes)
    assert attributes["acn-fctn"] == "SLXD4DE_RX"
    found = found_from_attributes(attributes, "192.168.3.21")
    assert found is not None
    # An unknown DCID still gives the family through the model name, and Shure through the DCID.
    assert (found.family, found.vendor, found.model) == (Family.SLXD, Vendor.SHURE, "SLXD4DE_RX")
    assert found.device_id == "DDB0C8C5-0000-11DD-A000-000EDDCCCCCC"
    assert found.name == "SLXD4DE G57"
    assert found.port == 2202 and found.supported and found.source == "slp"


def test_trailing_bytes_and_auth_blocks() -> None:
    body = encode_message(SlpMessage(FunctionId.ATTR_RPLY, attributes=f"(csl-esta.dmp=cd:{AD4Q})"))
    # One auth block (BSD 2, length 10 incl. its 4-byte header, 6 bytes payload) instead of "none".
    with_auth = body[:-1] + b"\x01" + b"\x00\x02\x00\x0a" + b"123456"
    with_auth = with_auth[:2] + len(with_auth).to_bytes(3, "big") + with_auth[5:]
    assert decode_message_strict(with_auth + b"garbage").attributes.endswith(AD4Q + ")")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter"),
        (b"\x01" + bytes(15), "version 1"),
        (b"\x02\x63" + bytes(14), "unknown SLP function"),
        (b"\x02\x07\x00\x00\x05" + bytes(11), "length field"),
        (b"\x02\x07\x00\x00\x40" + bytes(11), "length field"),
        (b"\x02\x07\x00\x00\x10" + bytes(7) + b"\x00\x02\xff\xfe", "not ASCII"),
        (b"\x02\x07\x00\x00\x12" + bytes(7) + b"\x00\x00" + b"\x00\x00\x00\x09", "past the end"),
        (b"\x02\x03\x00\x00\x14" + bytes(7) + b"\x00\x00" + b"\x00\x01\x00\x00\x00\x09", "past the end"),
    ],
)
def test_malformed_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(SlpDecodeError, match=reason):
        decode_message_strict(data)
    assert decode_message(data) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_junk_never_raises(data: bytes) -> None:
    message = decode_message(data)
    if message is not None:
        found_from_attributes(parse_attributes(message.attributes), "192.0.2.1")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(FunctionId)),
    st.binary(max_size=120),
)
def test_junk_after_a_valid_header_never_raises(function: FunctionId, tail: bytes) -> None:
    length = 16 + len(tail)
    data = (
        struct.pack(">BB3sH3sHH", 2, function, length.to_bytes(3, "big"), 0, b"\0\0\0", 1, 2) + b"en" + tail
    )
    decode_message(data)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_attribute_parser_never_raises(text: str) -> None:
    attributes = parse_attributes(text)
    dcid_from_attributes(attributes)
    found_from_attributes(attributes, "192.0.2.1")


def test_parse_attributes_shapes() -> None:
    text = "junk (A=1),(keyword),((nested)=x),(b = two words ),(=novalue),(cut=off"
    assert parse_attributes(text) == {"a": "1", "keyword": "", "(nested)": "x", "b": "two words"}


@pytest.mark.parametrize(
    ("dmp", "dcid"),
    [
        (f"esta.sdt/10.0.0.2:57383;esta.dmp/cd:{AD4Q.lower()}", AD4Q),
        (f"esta.sdt/10.0.0.2:57383;esta.dmp/d:{AD4Q}", AD4Q),
        (f"cd:{AD4Q}", AD4Q),
        ("esta.dmp/cd:not-a-uuid", None),
        (f"xd:{AD4Q}", None),
    ],
)
def test_dcid_in_dmp(dmp: str, dcid: str | None) -> None:
    assert dcid_from_attributes({"csl-esta.dmp": dmp}) == dcid
    assert dcid_from_attributes({}) is None


@pytest.mark.parametrize(
    ("dcid", "model", "family"),
    [
        ("040688F8-FD5A-11E3-81EF-0015C5F3F612", "ULXD4", Family.ULXD),
        ("0406C584-FD5A-11E3-AD62-0015C5F3F612", "ULXD4D", Family.ULXD),
        ("0407257E-FD5A-11E3-A21F-0015C5F3F612", "ULXD4Q", Family.ULXD),
        ("0405BFCC-FD5A-11E3-BEEE-0015C5F3F612", "QLXD4", Family.QLXD),
        ("042D1C02-FD5A-11E3-B298-0015C5F3F612", "AD4D", Family.AXIENT),
        ("042d5a00-fd5a-11e3-a553-0015c5f3f612", "AD4Q", Family.AXIENT),
        ("CCB8DB5C-E139-11DF-8A4C-0015C5F3F612", "UR4D", None),
        ("041382D8-FD5A-11E3-A8AA-0015C5F3F612", "PSM1000", None),
    ],
)
def test_dcid_table(dcid: str, model: str, family: Family | None) -> None:
    entry = lookup_dcid(dcid)
    assert entry is not None
    assert (entry.model, entry.family, entry.vendor) == (model, family, Vendor.SHURE)
    assert entry.supported is (family is not None)
    found = found_from_attributes({"csl-esta.dmp": f"esta.dmp/cd:{dcid}"}, "10.1.1.1")
    assert found is not None
    assert (found.model, found.family, found.supported) == (model, family, family is not None)
    assert found.device_id is None


def test_dcid_helpers() -> None:
    assert len(SHURE_DCIDS) == 8
    assert lookup_dcid("nonsense") is None
    assert lookup_dcid("00000000-0000-0000-0000-000000000000") is None
    assert normalize_dcid(" 042d5a00-fd5a-11e3-a553-0015c5f3f612 ") == AD4Q
    assert is_shure_dcid("11111111-2222-3333-4444-0015C5F3F612")
    assert not is_shure_dcid("11111111-2222-3333-4444-000000000000")
    assert not is_shure_dcid("junk")


@pytest.mark.parametrize(
    ("model", "family", "vendor"),
    [
        ("ULXD4Q", Family.ULXD, Vendor.SHURE),
        ("ULX-D4D", Family.ULXD, Vendor.SHURE),
        ("QLXD4", Family.QLXD, Vendor.SHURE),
        ("AD4Q-A", Family.AXIENT, Vendor.SHURE),
        ("SLXD4D", Family.SLXD, Vendor.SHURE),
        ("UR4D", None, Vendor.SHURE),
        ("EW-DX EM 4", Family.EWDX, Vendor.SENNHEISER),
        ("EW-DX EM 2 Dante", Family.EWDX, Vendor.SENNHEISER),
        ("EM 6000", Family.D6000, Vendor.SENNHEISER),
        ("EM 9000", None, Vendor.SENNHEISER),
        ("Yamaha Console", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_model_names(model: str | None, family: Family | None, vendor: Vendor | None) -> None:
    assert family_for_model(model) is family
    assert vendor_for_model(model) is vendor


def test_family_catalog() -> None:
    assert {vendor_for_family(f) for f in (Family.ULXD, Family.QLXD, Family.AXIENT, Family.SLXD)} == {
        Vendor.SHURE
    }
    assert default_port(Family.AXIENT) == 2202
    assert default_port(Family.EWDX) == 45
    assert default_port(Family.D6000) == 45


def test_found_from_attributes_without_dcid_or_model() -> None:
    assert found_from_attributes({"acn-uacn": "Desk"}, "10.0.0.1") is None
    unknown = found_from_attributes({"acn-fctn": "Yamaha Console"}, "10.0.0.9")
    assert unknown is not None
    assert (unknown.vendor, unknown.family, unknown.supported) == (None, None, False)
    odd = found_from_attributes({"csl-esta.dmp": "cd:11111111-2222-3333-4444-0015C5F3F612"}, "10.0.0.7")
    assert odd is not None and odd.vendor is Vendor.SHURE and not odd.supported
    foreign = found_from_attributes({"csl-esta.dmp": "cd:77777777-3333-2222-3333-123456789090"}, "10.0.0.8")
    assert foreign is not None and foreign.vendor is None and foreign.model is None


@pytest.mark.parametrize(("raw", "port"), [("4321", 4321), ("0", 2202), ("99999", 2202), ("x", 2202)])
def test_control_port_attribute(raw: str, port: int) -> None:
    found = found_from_attributes({"csl-esta.dmp": f"cd:{AD4Q}", CONTROL_PORT_TAG: raw}, "127.0.0.1")
    assert found is not None and found.port == port


def test_build_attributes_round_trip() -> None:
    text = build_attributes(
        AD4Q.lower(), cid=CID.lower(), address="10.0.0.5", model="AD4Q", name="Rack A", control_port=40000
    )
    attributes = parse_attributes(text)
    assert attributes["cid"] == CID
    assert attributes[CONTROL_PORT_TAG] == "40000"
    found = found_from_attributes(attributes, "10.0.0.5")
    assert found is not None
    assert (found.model, found.family, found.name, found.port, found.device_id) == (
        "AD4Q",
        Family.AXIENT,
        "Rack A",
        40000,
        CID,
    )
    assert CONTROL_PORT_TAG not in build_attributes(AD4Q, cid=CID, address="10.0.0.5")


def test_announcer_message_and_identity() -> None:
    announcer = SlpAnnouncer(AD4Q, device_id="sim-ad4q-1", name="AD Rack", control_port=4000)
    again = SlpAnnouncer(AD4Q.lower(), device_id="sim-ad4q-1")
    assert announcer.cid == again.cid  # a stable UUID derived from the device id
    assert SlpAnnouncer(AD4Q, device_id=CID.lower()).cid == CID
    assert announcer.model == "AD4Q"
    assert SlpAnnouncer("11111111-2222-3333-4444-0015C5F3F612", device_id="x").model is None
    message = decode_message_strict(announcer.attribute_reply(xid=42))
    assert message.function is FunctionId.ATTR_RPLY and message.xid == 42
    found = found_from_attributes(parse_attributes(message.attributes), "127.0.0.1")
    assert found is not None
    assert (found.family, found.port, found.device_id, found.name) == (
        Family.AXIENT,
        4000,
        announcer.cid,
        "AD Rack",
    )


def test_announcer_for_a_simulator_announcement() -> None:
    with_slp = Announcement("_shure._tcp.local.", "Rack Q", 41000, {"model": "ULXD4Q"}, slp_dcid=AD4Q)
    announcer = SlpAnnouncer.for_announcement(with_slp, device_id="sim-1", interval_s=1.0)
    assert announcer is not None
    assert (announcer.dcid, announcer.model, announcer.name, announcer.control_port, announcer.interface) == (
        AD4Q,
        "ULXD4Q",
        "Rack Q",
        41000,
        "127.0.0.1",
    )
    without = Announcement("_ssc._udp.local.", "EM4", 45)
    assert SlpAnnouncer.for_announcement(without, device_id="sim-2") is None


def test_bad_interfaces_and_dcids_are_refused() -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        SlpAnnouncer("ULXD", device_id="x")
    with pytest.raises(ConfigError, match="not an IPv4"):
        SlpAnnouncer(AD4Q, device_id="x", interface="eth0")
    with pytest.raises(ConfigError, match="at least one"):
        SlpListener(lambda _f: None, interfaces=())
    with pytest.raises(ConfigError, match="not an IPv4"):
        SlpListener(lambda _f: None, interfaces=("::1",))
