"""The API's request and response models: handlers validate and serialize with them, and the
OpenAPI document is generated from them, so the two cannot disagree."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bounds that keep every value inside what both databases store: ids are 32-bit, times 53-bit.
MAX_ID = 2**31 - 1
MAX_MS = 2**53 - 1

SiteName = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$", description="a site token")]
AgentName = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$", description="an agent token")]
# No NUL: PostgreSQL text cannot hold it, and it is never meaningful here.
SearchText = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
# At least one character that is not a blank: a name of spaces alone names nothing.
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
EpochMs = Annotated[int, Field(ge=0, le=MAX_MS)]
DeviceStatus = Literal["online", "offline", "stale"]
Worst = Literal["critical", "warning", "offline", "stale", "ok"]
BatteryStateName = Literal[
    "good", "replace", "critical", "unknown", "previously_good", "previously_replace", "previously_critical"
]
AlertState = Literal["open", "acknowledged", "resolved"]


class _Request(BaseModel):
    # Unknown query parameters and body fields are refused, not ignored: a typo must not
    # silently widen a listing or drop a change.
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class NoQuery(_Request):
    """An endpoint without query parameters."""


class NoBody(_Request):
    """An endpoint without a request body."""


class PageQuery(_Request):
    """Pagination: ``limit`` items from ``offset``."""

    limit: int = Field(default=100, ge=1, le=1000, description="page size")
    offset: int = Field(default=0, ge=0, le=10_000_000, description="items to skip")


ItemT = TypeVar("ItemT", bound=BaseModel)


class Page(_Response, Generic[ItemT]):
    """A page of a listing and the total number of matching items."""

    items: list[ItemT]
    total: int
    limit: int
    offset: int


class Problem(_Response):
    """An error (RFC 9457 problem details) with a stable machine-readable ``code``."""

    type: str
    title: str
    status: int
    detail: str
    code: str


# --- sites -------------------------------------------------------------------------------------


class SiteQuery(PageQuery):
    """Filters and order of the site listing."""

    sort: Literal["worst", "-worst", "site", "-site", "last_seen_ms", "-last_seen_ms"] = Field(
        default="worst", description="'worst' lists the sites in the worst state first"
    )
    worst: Worst | None = None


class DeviceCounts(_Response):
    """How many devices are in each state."""

    online: int
    offline: int
    stale: int


class SiteItem(_Response):
    """A site at a glance."""

    site: str
    devices: DeviceCounts
    channels: int
    open_alerts: int = Field(description="alerts in force (open or acknowledged)")
    worst: Worst = Field(description="critical/warning: the worst alert in force; else offline, stale or ok")
    last_seen_ms: int | None


class SitePage(Page[SiteItem]):
    """A page of sites."""


# --- agents ------------------------------------------------------------------------------------


class AgentQuery(PageQuery):
    """Filters and order of the agent listing."""

    site: SiteName | None = None
    status: Annotated[str, Field(pattern=r"^[a-z_]{1,16}$")] | None = None
    sort: Literal["agent", "-agent", "site", "-site", "last_seen_ms", "-last_seen_ms"] = "site"


class AgentItem(_Response):
    """An agent and how it is doing."""

    agent: str
    site: str
    status: str
    version: str | None
    hostname: str | None
    last_seen_ms: int
    outbox_depth: int
    dropped: int
    started_ms: int | None = Field(
        default=None, description="when the agent last started (its clock, from its newest hello), if heard"
    )
    devices: DeviceCounts = Field(description="its receivers, by the state the desk sees")


class AgentPage(Page[AgentItem]):
    """A page of agents."""


class AgentForget(_Request):
    """Which agent to forget."""

    agent: AgentName


class AgentForgotten(_Response):
    """What forgetting an agent removed."""

    agent: str
    site: str
    devices: int = Field(description="receivers removed with it")
    alerts_resolved: int = Field(description="its alerts and its receivers' that were in force")
    site_removed: bool = Field(description="whether its site went too (it was the site's last agent)")


# --- devices -----------------------------------------------------------------------------------

_DEVICE_SORTS = Literal[
    "id",
    "-id",
    "site",
    "-site",
    "name",
    "-name",
    "model",
    "-model",
    "status",
    "-status",
    "updated_ms",
    "-updated_ms",
]


class DeviceQuery(PageQuery):
    """Filters and order of the device listing."""

    site: SiteName | None = None
    status: DeviceStatus | None = None
    vendor: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")] | None = None
    q: SearchText | None = Field(default=None, description="text in the name, model, key or address")
    low_battery: bool | None = Field(
        default=None, description="true: only devices with a transmitter at 3 bars or fewer"
    )
    sort: _DEVICE_SORTS = "site"


class DeviceItem(_Response):
    """A receiver in a listing."""

    id: int
    site: str
    agent: str
    device_key: str
    vendor: str
    family: str
    model: str | None
    name: str | None
    status: str
    address: str | None
    firmware: str | None
    updated_ms: int
    channel_count: int


class DeviceDetail(DeviceItem):
    """A receiver with its full normalized state."""

    device: dict[str, Any]


class DevicePage(Page[DeviceItem]):
    """A page of devices."""


# --- channels ----------------------------------------------------------------------------------


class ChannelQuery(PageQuery):
    """Filters and order of the channel listing."""

    site: SiteName | None = None
    device_id: Id | None = None
    status: DeviceStatus | None = None
    q: SearchText | None = Field(default=None, description="text in the channel or device name")
    sort: Literal[
        "site", "-site", "name", "-name", "battery_percent", "-battery_percent", "updated_ms", "-updated_ms"
    ] = Field(default="site", description="'site' orders by site, device and channel index")


class TransmitterItem(_Response):
    """The transmitter linked to a channel."""

    model: str | None
    battery_bars: int | None
    battery_percent: int | None
    runtime_min: int | None
    battery_type: str | None
    muted: bool | None


class ChannelItem(_Response):
    """A receiver channel as a tile shows it."""

    device_id: int
    site: str
    agent: str
    device_key: str
    device_name: str | None
    model: str | None
    status: str = Field(description="the device's status")
    index: int
    name: str | None
    name_id: str | None
    name_person: str | None
    frequency_khz: int | None
    group_channel: str | None
    tx: TransmitterItem | None
    battery_state: BatteryStateName
    updated_ms: int


class ChannelPage(Page[ChannelItem]):
    """A page of channels."""


# --- alerts ------------------------------------------------------------------------------------


class ThresholdsQuery(_Request):
    """Whose alert thresholds."""

    site: SiteName


ThresholdValue = Annotated[float, Field(allow_inf_nan=False)]


class ThresholdsChange(_Request):
    """Overrides of a site's alert thresholds to set and to drop; the others stay as they are."""

    site: SiteName
    values: dict[str, ThresholdValue] = Field(
        default_factory=dict,
        max_length=32,
        description="threshold name -> value, e.g. battery_replace_bars: 2",
    )
    reset: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="names of overrides to drop (the default applies again)",
    )


class ThresholdsItem(_Response):
    """A site's alert thresholds: its own overrides and every threshold in force there."""

    site: str
    overrides: dict[str, int | float] = Field(description="the values this site sets; the rest are defaults")
    in_force: dict[str, int | float] = Field(
        description="every threshold as the alert rules and tiles apply it"
    )
    defaults: dict[str, int | float] = Field(description="every threshold of a site without overrides")


class AlertQuery(PageQuery):
    """Filters and order of the alert listing."""

    state: AlertState | None = None
    site: SiteName | None = None
    severity: Annotated[str, Field(pattern=r"^[a-z]{1,16}$")] | None = None
    sort: Literal["-opened_ms", "opened_ms", "severity", "-severity"] = "-opened_ms"


class AlertItem(_Response):
    """An alert and who handled it."""

    id: int
    site: str
    agent: str
    device_key: str | None
    channel: int | None
    rule: str
    severity: str
    state: str
    message: str
    opened_ms: int
    acknowledged_by: str | None = None
    acknowledged_ms: int | None = None
    resolved_by: str | None = None
    resolved_ms: int | None = None
    # As the receiver and channel are called now (listings; live messages leave them out).
    device_name: str | None = Field(default=None, description="the receiver's name, else its model")
    channel_name: str | None = Field(default=None, description="the channel's name now")


class AlertPage(Page[AlertItem]):
    """A page of alerts."""


# --- history -----------------------------------------------------------------------------------


class HistoryQuery(_Request):
    """The time range and resolution of a channel's history (default: the last hour)."""

    from_ms: EpochMs | None = None
    to_ms: EpochMs | None = None
    resolution_s: int | None = Field(default=None, ge=1, le=86_400)


class HistoryPoint(_Response):
    """One bucket of a channel's history."""

    ts_ms: int
    battery_percent: int | None
    battery_bars: int | None
    rf_dbm: float | None = Field(description="the best RF of the bucket (dBm)")
    rf_dbm_min: float | None = Field(description="the weakest RF of the bucket: where a dropout shows (dBm)")
    audio_dbfs: float | None = Field(description="the loudest audio level of the bucket (dBFS)")
    audio_peak_dbfs: float | None = Field(description="the highest audio peak of the bucket (dBFS)")


class HistoryResponse(_Response):
    """A channel's history, oldest first."""

    items: list[HistoryPoint]


# --- commands ----------------------------------------------------------------------------------


class CommandRequest(_Request):
    """A command for a device: rename or mute a channel, or make the device identify itself."""

    action: Literal["rename", "identify", "mute", "unmute"]
    channel: Annotated[int, Field(ge=1, le=64)] | None = None
    value: Annotated[str, Field(max_length=128, pattern=r"^[^\x00]*$")] | None = None


class CommandResponse(_Response):
    """What came of a command."""

    outcome: Literal["ok", "not_supported", "device_offline", "invalid", "failed", "agent_unreachable"]
    detail: str | None = None


# --- groups ------------------------------------------------------------------------------------


class GroupChannel(_Request):
    """A channel in a group."""

    device_id: Id
    index: Annotated[int, Field(ge=1, le=64)]


class GroupBody(_Request):
    """A group of channels the user arranged."""

    name: Name
    site: SiteName | None = None
    channels: list[GroupChannel] = Field(default_factory=list, max_length=1000)
    position: int = Field(default=0, ge=-1_000_000, le=1_000_000)

    @model_validator(mode="after")
    def _each_channel_once(self) -> GroupBody:
        seen: set[tuple[int, int]] = set()
        for channel in self.channels:
            key = (channel.device_id, channel.index)
            if key in seen:
                raise ValueError(
                    f"channel {channel.index} of device {channel.device_id} is in the group twice"
                )
            seen.add(key)
        return self


class GroupItem(_Response):
    """A stored group."""

    id: int
    name: str
    site: str | None
    channels: list[GroupChannel]
    position: int


class GroupPage(Page[GroupItem]):
    """A page of groups, by position."""


# --- tokens ------------------------------------------------------------------------------------


class TokenCreate(_Request):
    """A token to create."""

    name: Name
    role: Literal["viewer", "operator", "admin"]


class TokenItem(_Response):
    """A token, without its secret."""

    id: int
    name: str
    role: str
    created_ms: int
    last_used_ms: int | None
    revoked: bool


class TokenCreated(TokenItem):
    """A new token: ``token`` is shown this once and never again."""

    token: str


class TokenPage(Page[TokenItem]):
    """A page of tokens."""


class SessionInfo(_Response):
    """The token a request came with: what the dashboard shows and offers depends on its role."""

    token_id: int
    name: str
    role: Literal["viewer", "operator", "admin"]


# --- health ------------------------------------------------------------------------------------


class Health(_Response):
    """Whether the collector can reach what it needs."""

    status: Literal["ok", "unhealthy"]
    version: str
    database: Literal["ok", "error"]
    nats: Literal["ok", "error"]
