"""The event envelope and the body of each event kind (the wire contract, schema version 1)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from micboard.shared.model import ChannelMeter, Device, ReceiverChannel, Transmitter

# Text fields are strict: msgpack's str type only, so raw bytes (its bin type) are refused
# rather than decoded, and numbers are finite.
Text = Annotated[str, Strict()]
Token = Annotated[str, Strict(), Field(pattern=r"^[a-z0-9_-]{1,64}$")]
BootId = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
EpochMs = Annotated[int, Strict(), Field(ge=0, lt=2**53)]
DeviceKey = Annotated[str, Strict(), Field(min_length=1, max_length=128)]
RequestId = Annotated[str, Strict(), Field(min_length=1, max_length=64)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HelloBody(_Body):
    """Sent once when an agent starts."""

    version: Text
    hostname: Text | None = None
    config: dict[Text, Text | int | FiniteFloat | bool | None] = Field(default_factory=dict)


class HeartbeatBody(_Body):
    """Sent every heartbeat interval: the agent is alive and this is how it is doing."""

    interval_s: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = 10.0
    uptime_s: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
    version: Text | None = None
    devices_by_state: dict[Text, Annotated[int, Strict(), Field(ge=0)]] = Field(default_factory=dict)
    outbox_depth: Annotated[int, Strict(), Field(ge=0)] = 0
    outbox_bytes: Annotated[int, Strict(), Field(ge=0)] = 0
    dropped: Annotated[int, Strict(), Field(ge=0)] = 0
    last_publish_error: Text | None = None


_DEVICE_FIELDS = frozenset(Device.model_fields) - {"device_key", "channels"}
_CHANNEL_FIELDS = frozenset(ReceiverChannel.model_fields) - {"index"}


def _field_adapter(info: FieldInfo) -> TypeAdapter[Any]:
    # Constraints of a top-level Annotated type are moved into ``metadata``; put them back.
    annotation: Any = info.annotation
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return TypeAdapter(annotation)


_FIELD_ADAPTERS: dict[tuple[str, str], TypeAdapter[Any]] = {
    **{("device", n): _field_adapter(f) for n, f in Device.model_fields.items()},
    **{("channel", n): _field_adapter(f) for n, f in ReceiverChannel.model_fields.items()},
}
_TRANSMITTER_ADAPTER: TypeAdapter[Transmitter | None] = TypeAdapter(Transmitter | None)


class DeviceBody(_Body):
    """A device's state: a full ``snapshot``, or ``changes`` (a delta of changed fields only)."""

    device_key: DeviceKey
    snapshot: Device | None = None
    changes: dict[str, Any] | None = None

    @field_validator("changes")
    @classmethod
    def _check_changes(cls, changes: dict[str, Any] | None) -> dict[str, Any] | None:
        # A delta is validated field by field against the model so that a bad value is
        # rejected at the edge, not when the collector merges it into stored state.
        if changes is None:
            return None
        for key, value in changes.items():
            if key == "channels":
                _check_channel_changes(value)
            elif key in _DEVICE_FIELDS:
                _check_field(_FIELD_ADAPTERS["device", key], value, key)
            else:
                raise ValueError(f"unknown device field {key!r} in changes")
        return changes

    @model_validator(mode="after")
    def _one_of(self) -> DeviceBody:
        if (self.snapshot is None) == (self.changes is None):
            raise ValueError("a device body has exactly one of 'snapshot' and 'changes'")
        if self.snapshot is not None and self.snapshot.device_key != self.device_key:
            raise ValueError("snapshot.device_key differs from the body's device_key")
        return self

    @property
    def is_snapshot(self) -> bool:
        """Whether this body carries a full snapshot rather than a delta."""
        return self.snapshot is not None


def _check_field(adapter: TypeAdapter[Any], value: Any, where: str) -> None:
    # Reported with the field's place in the delta: pydantic's own location stops at "changes".
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        inner = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"{where}{'.' + inner if inner else ''}: {error['msg']}") from None


def _check_channel_changes(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError("'channels' in changes must map channel index to changed fields")
    for index, diff in value.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= 64:
            raise ValueError(f"channel index {index!r} must be an integer 1..64")
        if not isinstance(diff, dict):
            raise ValueError(f"changes of channel {index} must be a map")
        for key, field_value in diff.items():
            if key == "index":
                if field_value != index:
                    raise ValueError(f"channel {index} changes carry index {field_value!r}")
            elif key == "transmitter":
                _check_field(_TRANSMITTER_ADAPTER, field_value, f"channels.{index}.transmitter")
            elif key in _CHANNEL_FIELDS:
                _check_field(_FIELD_ADAPTERS["channel", key], field_value, f"channels.{index}.{key}")
            else:
                raise ValueError(f"unknown channel field {key!r} in changes")


class OfflineReason(StrEnum):
    """Why a device is reported offline."""

    SILENT = "silent"
    CONNECT_FAILED = "connect_failed"
    REMOVED = "removed"


class OfflineBody(_Body):
    """A device stopped answering."""

    device_key: DeviceKey
    reason: OfflineReason = OfflineReason.SILENT
    detail: Text | None = None
    last_seen_ts: EpochMs | None = None


class DiscoveredBody(_Body):
    """Something answered discovery (kept even if it is not polled)."""

    source: Literal["mdns", "slp", "static"]
    address: Text
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] | None = None
    vendor: Text | None = None
    family: Text | None = None
    model: Text | None = None
    device_id: Text | None = None
    name: Text | None = None
    supported: Annotated[bool, Strict()] = False


class MeterBody(_Body):
    """Live levels of some channels of one device (core NATS, latest wins)."""

    device_key: DeviceKey
    channels: tuple[ChannelMeter, ...]


class CommandAction(StrEnum):
    """What the collector can ask an agent to do."""

    RENAME = "rename"
    IDENTIFY = "identify"
    MUTE = "mute"
    UNMUTE = "unmute"
    REDISCOVER = "rediscover"


class CommandBody(_Body):
    """A command request sent by the collector to one agent (core NATS request/reply)."""

    request_id: RequestId
    action: CommandAction
    device_key: DeviceKey | None = None
    channel: Annotated[int, Strict(), Field(ge=1, le=64)] | None = None
    value: Annotated[str, Strict(), Field(max_length=128)] | None = None


class CommandOutcome(StrEnum):
    """The typed outcome of a command."""

    OK = "ok"
    NOT_SUPPORTED = "not_supported"
    DEVICE_OFFLINE = "device_offline"
    INVALID = "invalid"
    FAILED = "failed"


class CommandResult(_Body):
    """The agent's reply to a :class:`CommandBody`."""

    request_id: RequestId
    outcome: CommandOutcome
    detail: Text | None = None


class _EnvelopeBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    site: Token
    agent: Token
    boot: BootId
    seq: Annotated[int, Strict(), Field(ge=0, lt=2**63)]
    ts: EpochMs


class HelloEvent(_EnvelopeBase):
    """Envelope of a ``hello`` event."""

    kind: Literal["hello"] = "hello"
    body: HelloBody


class HeartbeatEvent(_EnvelopeBase):
    """Envelope of a ``heartbeat`` event."""

    kind: Literal["heartbeat"] = "heartbeat"
    body: HeartbeatBody


class DeviceEvent(_EnvelopeBase):
    """Envelope of a ``device`` event (snapshot or delta)."""

    kind: Literal["device"] = "device"
    body: DeviceBody


class OfflineEvent(_EnvelopeBase):
    """Envelope of an ``offline`` event."""

    kind: Literal["offline"] = "offline"
    body: OfflineBody


class DiscoveredEvent(_EnvelopeBase):
    """Envelope of a ``discovered`` event."""

    kind: Literal["discovered"] = "discovered"
    body: DiscoveredBody


class MeterEvent(_EnvelopeBase):
    """Envelope of a ``meter`` event."""

    kind: Literal["meter"] = "meter"
    body: MeterBody


class CommandEvent(_EnvelopeBase):
    """Envelope of a ``cmd`` request."""

    kind: Literal["cmd"] = "cmd"
    body: CommandBody


Envelope = Annotated[
    HelloEvent | HeartbeatEvent | DeviceEvent | OfflineEvent | DiscoveredEvent | MeterEvent | CommandEvent,
    Field(discriminator="kind"),
]
"""Any event of the wire contract, discriminated by its ``kind``."""

AnyEvent = (
    HelloEvent | HeartbeatEvent | DeviceEvent | OfflineEvent | DiscoveredEvent | MeterEvent | CommandEvent
)
