"""msgpack codec of the wire contract: every failure to decode is one typed :class:`WireError`."""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from micboard.shared import SCHEMA_VERSION
from micboard.shared.envelope import AnyEvent, CommandResult, Envelope
from micboard.shared.errors import ErrorCode, WireError

#: Default cap on an encoded event; larger messages are refused on both sides.
DEFAULT_MAX_BYTES = 256 * 1024

_ENVELOPE: TypeAdapter[AnyEvent] = TypeAdapter(Envelope)
_ModelT = TypeVar("_ModelT", bound=BaseModel)
# What msgpack raises on malformed input: its own errors derive from ValueError, but
# unhashable map keys raise TypeError and pathological nesting RecursionError.
_UNPACK_ERRORS = (ValueError, TypeError, RecursionError, OverflowError, MemoryError)


def encode(event: BaseModel, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Encode an event (or a command result) to msgpack, refusing one larger than ``max_bytes``."""
    data: bytes = msgpack.packb(event.model_dump(mode="python"), use_bin_type=True)
    if len(data) > max_bytes:
        raise WireError(
            ErrorCode.WIRE_TOO_LARGE,
            f"encoded {type(event).__name__} is {len(data)} bytes, over the {max_bytes} byte cap",
        )
    return data


def _unpack(data: bytes, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(ErrorCode.WIRE_GARBAGE, f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(
            ErrorCode.WIRE_TOO_LARGE, f"message is {len(data)} bytes, over the {max_bytes} byte cap"
        )
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=0)
    except _UNPACK_ERRORS as exc:
        raise WireError(ErrorCode.WIRE_GARBAGE, f"not a msgpack message: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError(ErrorCode.WIRE_GARBAGE, f"expected a msgpack map, got {type(obj).__name__}")
    return obj


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[:3]
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in first]
    more = exc.error_count() - len(first)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> AnyEvent:
    """Decode and validate one event; raises :class:`WireError` and nothing else on bad input."""
    obj = _unpack(data, max_bytes)
    version = obj.get("v")
    # Exactly the integer: not True, not 1.0.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise WireError(
            ErrorCode.WIRE_UNKNOWN_VERSION,
            f"unknown schema version {version!r}; this build speaks version {SCHEMA_VERSION}",
        )
    try:
        return _ENVELOPE.validate_python(obj)
    except ValidationError as exc:
        raise WireError(ErrorCode.WIRE_INVALID, _validation_message(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise WireError(ErrorCode.WIRE_INVALID, f"invalid event: {exc}") from None


def decode_model(data: bytes, model: type[_ModelT], *, max_bytes: int = DEFAULT_MAX_BYTES) -> _ModelT:
    """Decode a msgpack map into ``model`` (such as :class:`CommandResult`), raising :class:`WireError`."""
    obj = _unpack(data, max_bytes)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise WireError(ErrorCode.WIRE_INVALID, _validation_message(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise WireError(ErrorCode.WIRE_INVALID, f"invalid {model.__name__}: {exc}") from None


def decode_command_result(data: bytes) -> CommandResult:
    """Decode an agent's reply to a command."""
    return decode_model(data, CommandResult)
