"""decode_meter: what a meter's bytes and subject decode to; a second delivery is not decoded again."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from micboard.collector.services.meters import decode_meter
from micboard.shared.codec import encode
from micboard.shared.envelope import HelloBody, HelloEvent, MeterBody, MeterEvent
from micboard.shared.model import ChannelMeter

SUBJECT = "micboard.v1.venue.pi-1.meter"


def _meter(seq: int = 1) -> MeterEvent:
    return MeterEvent(
        site="venue",
        agent="pi-1",
        boot="boot-1",
        seq=seq,
        ts=int(time.time() * 1000),
        body=MeterBody(device_key="rx1", channels=(ChannelMeter(index=1, audio_dbfs=-20.0),)),
    )


def test_a_meter_decodes_and_anything_else_is_none() -> None:
    event = _meter()
    assert decode_meter(SUBJECT, encode(event)) == event
    assert decode_meter(SUBJECT, b"\xc1 garbage") is None
    # Another agent's meter on this agent's subject, and another kind of event.
    assert decode_meter("micboard.v1.venue.pi-2.meter", encode(event)) is None
    hello = HelloEvent(
        site="venue", agent="pi-1", boot="boot-1", seq=2, ts=event.ts, body=HelloBody(version="1")
    )
    assert decode_meter(SUBJECT, encode(hello)) is None


def test_the_second_delivery_of_the_same_bytes_is_not_decoded_again() -> None:
    data = encode(_meter(seq=7))
    copy = bytes(bytearray(data))  # equal bytes in another object, as a second subscription gets them
    assert copy is not data
    first = decode_meter(SUBJECT, data)
    hits = decode_meter.cache_info().hits
    second = decode_meter(SUBJECT, copy)
    assert second is first and decode_meter.cache_info().hits == hits + 1


@given(st.binary(max_size=2048), st.sampled_from([SUBJECT, "micboard.v1.x.y.meter", ""]))
def test_any_bytes_decode_to_a_meter_or_none(data: bytes, subject: str) -> None:
    result = decode_meter(subject, data)
    assert result is None or isinstance(result, MeterEvent)
