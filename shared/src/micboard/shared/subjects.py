"""NATS subjects of the wire contract: ``micboard.v1.<site>.<agent>.<kind>`` and Msg-Id rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from micboard.shared.errors import SubjectError

SUBJECT_PREFIX = "micboard.v1"
_TOKEN = re.compile(r"[a-z0-9_-]{1,64}")


class Kind(StrEnum):
    """The kinds of event an agent and the collector exchange."""

    HELLO = "hello"
    HEARTBEAT = "heartbeat"
    DEVICE = "device"
    OFFLINE = "offline"
    DISCOVERED = "discovered"
    METER = "meter"
    CMD = "cmd"


#: Kinds that go through JetStream (persisted, deduplicated); the rest use core NATS.
JETSTREAM_KINDS: frozenset[Kind] = frozenset(
    {Kind.HELLO, Kind.HEARTBEAT, Kind.DEVICE, Kind.OFFLINE, Kind.DISCOVERED}
)


def validate_token(value: str, what: str) -> str:
    """Return ``value`` if it is a valid site or agent token, else raise :class:`SubjectError`."""
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise SubjectError(
            f"{what} {value!r} is not a valid token: use 1 to 64 characters of "
            "lower-case letters, digits, '_' or '-'"
        )
    return value


@dataclass(frozen=True, slots=True)
class Subject:
    """The parts of an event subject."""

    site: str
    agent: str
    kind: Kind

    def __str__(self) -> str:
        return f"{SUBJECT_PREFIX}.{self.site}.{self.agent}.{self.kind.value}"


def build_subject(site: str, agent: str, kind: Kind | str) -> str:
    """Build the subject for an event of ``kind`` from ``agent`` at ``site``."""
    validate_token(site, "site")
    validate_token(agent, "agent")
    try:
        kind = Kind(kind)
    except ValueError:
        raise SubjectError(f"unknown event kind {kind!r}") from None
    return f"{SUBJECT_PREFIX}.{site}.{agent}.{kind.value}"


def parse_subject(subject: object) -> Subject:
    """Split an event subject into its parts, raising :class:`SubjectError` if it is malformed.

    Anything but a ``str`` (``None``, the ``bytes`` of a raw message) is malformed too.
    """
    if not isinstance(subject, str):
        raise SubjectError(f"a subject is text (str), not {type(subject).__name__}")
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != SUBJECT_PREFIX:
        raise SubjectError(
            f"subject {subject!r} does not have the form {SUBJECT_PREFIX}.<site>.<agent>.<kind>"
        )
    site, agent, kind = parts[2], parts[3], parts[4]
    validate_token(site, "site")
    validate_token(agent, "agent")
    try:
        return Subject(site, agent, Kind(kind))
    except ValueError:
        raise SubjectError(f"subject {subject!r} has unknown kind {kind!r}") from None


def stream_subjects() -> list[str]:
    """Subjects the JetStream stream captures: every JetStream kind of every site and agent."""
    return [f"{SUBJECT_PREFIX}.*.*.{kind.value}" for kind in sorted(JETSTREAM_KINDS)]


def msg_id(agent: str, boot: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of an agent's event: ``<agent>.<boot>.<seq>``."""
    return f"{agent}.{boot}.{seq}"
