"""Subjects and Msg-Ids of the wire contract."""

from __future__ import annotations

import pytest

from micboard.shared.errors import ErrorCode, SubjectError
from micboard.shared.subjects import (
    JETSTREAM_KINDS,
    Kind,
    Subject,
    build_subject,
    msg_id,
    parse_subject,
    stream_subjects,
    validate_token,
)


def test_build_and_parse_round_trip() -> None:
    subject = build_subject("venue_1", "pi-01", Kind.DEVICE)
    assert subject == "micboard.v1.venue_1.pi-01.device"
    parsed = parse_subject(subject)
    assert parsed == Subject("venue_1", "pi-01", Kind.DEVICE)
    assert str(parsed) == subject
    assert build_subject("a", "b", "meter") == "micboard.v1.a.b.meter"


@pytest.mark.parametrize("token", ["", "A", "a.b", "a b", "x" * 65, "é", "a*", ">"])
def test_bad_tokens_are_refused_with_a_clear_message(token: str) -> None:
    with pytest.raises(SubjectError) as info:
        build_subject(token, "agent", Kind.HELLO)
    assert info.value.code is ErrorCode.SUBJECT_INVALID
    assert "lower-case letters" in info.value.message
    with pytest.raises(SubjectError):
        validate_token(token, "agent")


def test_token_limits_accepted() -> None:
    assert validate_token("x" * 64, "site") == "x" * 64
    assert validate_token("a_b-9", "site") == "a_b-9"


@pytest.mark.parametrize(
    "subject",
    [
        "micboard.v1.site.agent",
        "micboard.v2.site.agent.device",
        "other.v1.site.agent.device",
        "micboard.v1.site.agent.unknown",
        "micboard.v1.Site.agent.device",
        "micboard.v1.site.agent.device.extra",
    ],
)
def test_malformed_subjects(subject: str) -> None:
    with pytest.raises(SubjectError):
        parse_subject(subject)


def test_unknown_kind_when_building() -> None:
    with pytest.raises(SubjectError, match="unknown event kind"):
        build_subject("a", "b", "nope")


def test_stream_subjects_cover_jetstream_kinds_only() -> None:
    subjects = stream_subjects()
    assert len(subjects) == len(JETSTREAM_KINDS)
    assert "micboard.v1.*.*.device" in subjects
    assert not any(s.endswith((".meter", ".cmd")) for s in subjects)


def test_msg_id_rule() -> None:
    assert msg_id("pi-01", "b00t", 42) == "pi-01.b00t.42"


@pytest.mark.parametrize(
    "subject",
    [None, b"micboard.v1.venue.pi-01.hello", bytearray(b"micboard.v1.a.b.hello"), 5, ["micboard"], object()],
    ids=["none", "bytes", "bytearray", "int", "list", "object"],
)
def test_a_subject_that_is_not_text_is_a_subject_error(subject: object) -> None:
    # What a caller passes on from a message (msg.subject may be missing, or raw bytes) is refused
    # with the typed error every caller handles, not an AttributeError or a TypeError.
    with pytest.raises(SubjectError) as info:
        parse_subject(subject)
    assert info.value.code is ErrorCode.SUBJECT_INVALID
    assert type(subject).__name__ in info.value.message
