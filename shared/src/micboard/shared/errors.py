"""The exception hierarchy of micboard, each error with a stable machine-readable code."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes: logged, counted and returned by APIs; never renamed once shipped."""

    WIRE_GARBAGE = "wire.garbage"
    WIRE_TOO_LARGE = "wire.too_large"
    WIRE_UNKNOWN_VERSION = "wire.unknown_version"
    WIRE_INVALID = "wire.invalid"
    SUBJECT_INVALID = "subject.invalid"
    CONFIG_INVALID = "config.invalid"
    NATS_SERVER_NOT_FOUND = "natsd.not_found"
    NATS_SERVER_FAILED = "natsd.failed"
    AGENT_START_FAILED = "agent.start_failed"
    OUTBOX_FAILED = "outbox.failed"


class MicboardError(Exception):
    """Base of every error micboard raises on purpose; ``code`` is stable, the message is for people."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class WireError(MicboardError):
    """Bytes or values that do not form a valid event of the wire contract."""


class SubjectError(WireError):
    """A NATS subject or one of its tokens does not follow ``micboard.v1.<site>.<agent>.<kind>``."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SUBJECT_INVALID, message)


class ConfigError(MicboardError):
    """A setting is missing or invalid."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CONFIG_INVALID, message)


class NatsServerError(MicboardError):
    """The embedded nats-server could not be found or did not become ready."""
