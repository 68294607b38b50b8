"""The event envelope and the body of each event kind (the wire contract, schema version 1)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, field_validator, model_validator
from pydantic.fields import FieldInfo

from micboard.shared.model import ChannelMeter, Device, ReceiverChannel, Transmitter

Token = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
BootId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
EpochMs = Annotated[int, Strict(), Field(ge=0, lt=2**53)]
DeviceKey = Annotated[str, Field(min_length=1, max_length=128)]


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HelloBody(_Body):
    """Sent once when an agent starts."""

    version: str
    hostname: str | None = None
    config: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class HeartbeatBody(_Body):
    """Sent every heartbeat interval: the agent is alive and this is how it is doing."""

    interval_s: Annotated[float, Strict(), Field(gt=0)] = 10.0
    uptime_s: Annotated[float, Strict(), Field(ge=0)]
    version: str | None = None
    devices_by_state: dict[str, Annotated[int, Strict(), Field(ge=0)]] = Field(default_factory=dict)
    outbox_depth: Annotated[int, Strict(), Field(ge=0)] = 0
    outbox_bytes: Annotated[int, Strict(), Field(ge=0)] = 0
    dropped: Annotated[int, Strict(), Field(ge=0)] = 0
    last_publish_error: str | None = None


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
                _FIELD_ADAPTERS["device", key].validate_python(value)
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
                _TRANSMITTER_ADAPTER.validate_python(field_value)
            elif key in _CHANNEL_FIELDS:
                _FIELD_ADAPTERS["channel", key].validate_python(field_value)
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
    detail: str | None = None
    last_seen_ts: EpochMs | None = None


class DiscoveredBody(_Body):
    """Something answered discovery (kept even if it is not polled)."""

    source: Literal["mdns", "slp", "static"]
    address: str
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] | None = None
    vendor: str | None = None
    family: str | None = None
    model: str | None = None
    device_id: str | None = None
    name: str | None = None
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

    request_id: Annotated[str, Field(min_length=1, max_length=64)]
    action: CommandAction
    device_key: DeviceKey | None = None
    channel: Annotated[int, Strict(), Field(ge=1, le=64)] | None = None
    value: Annotated[str, Field(max_length=128)] | None = None


class CommandOutcome(StrEnum):
    """The typed outcome of a command."""

    OK = "ok"
    NOT_SUPPORTED = "not_supported"
    DEVICE_OFFLINE = "device_offline"
    INVALID = "invalid"
    FAILED = "failed"


class CommandResult(_Body):
    """The agent's reply to a :class:`CommandBody`."""

    request_id: Annotated[str, Field(min_length=1, max_length=64)]
    outcome: CommandOutcome
    detail: str | None = None


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
