"""Agent settings: ``MICBOARD_*`` environment variables, an optional ``.env``, or a TOML file."""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from micboard.agent.discovery.mdns import full_service_type
from micboard.shared.envelope import Token
from micboard.shared.errors import ConfigError
from micboard.shared.model import Family
from micboard.shared.secret_files import check_config_file
from micboard.shared.settings import MicboardSettings, StrList, build_settings, load_settings

Port = Annotated[int, Field(ge=1, le=65535)]

COLLECTOR_REQUEST_TIMEOUT_S = 5.0
"""How long the collector waits for an agent's reply to a command (not configurable there)."""

STALE_LINK_MAX_S = 600.0
"""The longest a dead NATS link may go unnoticed (ping interval times unanswered pings + 1)."""


class StaticDeviceSetting(BaseModel):
    """A receiver listed by address: for devices that announce nothing (or not on this LAN)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(min_length=1, max_length=253)
    family: Family
    port: Port | None = None
    name: str | None = Field(default=None, max_length=128)


class AgentSettings(MicboardSettings):
    """Everything the venue agent needs to know to run."""

    site: Token = Field(default="demo", description="site token: [a-z0-9_-]{1,64}")
    agent: Token = Field(default="agent-1", description="agent token, unique in the fleet")
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=300)
    publish_timeout_s: float = Field(default=5.0, gt=0, le=60)
    nats_connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    nats_ping_interval_s: float = Field(
        default=10.0, gt=0, le=300, description="seconds between the client's PINGs to the NATS server"
    )
    nats_max_outstanding_pings: int = Field(
        default=3,
        ge=1,
        le=100,
        description="unanswered PINGs after which the NATS link is declared lost and reconnected",
    )
    """A link that died without a word (a NAT dropping state, a router rebooting, a frozen server)
    is noticed after about ``nats_ping_interval_s * (nats_max_outstanding_pings + 1)`` seconds
    (40 s by default; nats-py's own defaults took 6 minutes): then the sender keeps events in the
    outbox and reconnects."""

    # Store-and-forward (see micboard.agent.outbox and micboard.agent.sender).
    outbox_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024 * 1024, description="outbox byte bound (oldest dropped first)"
    )
    outbox_max_age_s: float = Field(default=7 * 24 * 3600, gt=0, description="outbox age bound")
    outbox_fsync_interval_s: float = Field(
        default=1.0, ge=0, le=60, description="power loss loses at most this much; 0 = fsync every write"
    )
    max_in_flight: int = Field(default=64, ge=1, le=4096, description="JetStream publishes awaiting acks")

    # Discovery: which sources run, where, and what is adopted.
    static_devices: list[StaticDeviceSetting] = Field(default_factory=list)
    discovery_mdns: bool = True
    discovery_slp: bool = True
    interfaces: StrList = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="IPv4 addresses of the interfaces mDNS and SLP use (loopback unless set)",
    )
    allow_cidrs: StrList = Field(default_factory=list, description="adopt only devices inside these")
    deny_cidrs: StrList = Field(default_factory=list, description="never adopt devices inside these")
    mdns_service_types: StrList | None = Field(
        default=None,
        description="DNS-SD types to browse instead of the standard ones (_ssc._udp or _ssc._udp.local.)",
    )
    extra_service_types: StrList = Field(
        default_factory=list, description="DNS-SD types browsed as well (_ssc._tcp or _ssc._tcp.local.)"
    )

    # State and meters.
    snapshot_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    meter_rate_hz: float = Field(default=4.0, gt=0, le=50)

    # Driver timings (see DriverOptions).
    meter_interval_ms: int = Field(default=100, ge=0, le=65_535)
    silence_timeout_s: float = Field(default=5.0, gt=0, le=300)
    connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    driver_command_timeout_s: float = Field(default=2.0, gt=0, le=60)
    poll_interval_s: float = Field(default=5.0, gt=0, le=300)
    reconnect_backoff_initial_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_backoff_max_s: float = Field(default=20.0, gt=0, le=600)

    # Commands, metrics, shutdown.
    command_timeout_s: float = Field(
        default=4.0, gt=0, description="deadline of a command reply; must stay below 5 s (see below)"
    )
    """Deadline of a command reply. It must stay below the collector's request timeout (5 s): past
    it the agent answers "no result within ...", and that answer is only of use if the collector
    is still waiting for it. At 5 s or more the collector has given up first and shows a bare
    timeout instead of what the agent knew."""
    metrics_port: Port | None = Field(default=None, description="Prometheus text on loopback; unset = off")
    metrics_host: str = Field(default="127.0.0.1", description="address the metrics endpoint binds")
    shutdown_timeout_s: float = Field(default=4.0, gt=0, le=30, description="budget for a clean stop")

    # NATS credentials and TLS (see micboard.agent.natsauth and docs/SECURITY.md).
    nats_nkey_seed_file: Path | None = Field(default=None, description="NKey user seed file (mode 0600)")
    nats_creds_file: Path | None = Field(default=None, description="NATS user credentials file (JWT)")
    nats_inbox_prefix: str | None = Field(
        default=None, description="inbox prefix; unset = _INBOX_agent.<site>.<agent>, as nats-config allows"
    )
    nats_tls_ca: Path | None = Field(default=None, description="CA that signed the NATS server certificate")
    nats_tls_cert: Path | None = Field(
        default=None, description="client certificate, if the server wants one"
    )
    nats_tls_key: Path | None = Field(default=None, description="client certificate key (mode 0600)")
    nats_tls_hostname: str | None = Field(
        default=None, description="name to verify in the server certificate"
    )
    nats_require_tls: bool = Field(default=False, description="refuse plaintext: tls:// URLs, TLS first")

    @model_validator(mode="after")
    def _check_dead_link_detection(self) -> AgentSettings:
        # A late PONG is awaited at most 10 minutes (publisher._LATE_PONG_S): the stale-link check
        # must have reconnected by then.
        noticed_s = self.nats_ping_interval_s * (self.nats_max_outstanding_pings + 1)
        if noticed_s > STALE_LINK_MAX_S:
            raise ValueError(
                f"nats_ping_interval_s * (nats_max_outstanding_pings + 1) is {noticed_s:g} s: a dead "
                f"NATS link must be noticed within {STALE_LINK_MAX_S:g} s"
            )
        return self

    @field_validator("interfaces")
    @classmethod
    def _check_interfaces(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ValueError(f"interface {address!r} is not an IPv4 address") from None
        if not value:
            raise ValueError("at least one interface address is needed")
        return value

    @field_validator("mdns_service_types", "extra_service_types")
    @classmethod
    def _check_service_types(cls, value: list[str] | None) -> list[str] | None:
        # Checked here, not when discovery starts: a bad type is a configuration error with
        # its value named, not a zeroconf exception out of a running agent.
        return None if value is None else [full_service_type(t) for t in value]

    @field_validator("command_timeout_s")
    @classmethod
    def _check_command_timeout(cls, value: float) -> float:
        if value >= COLLECTOR_REQUEST_TIMEOUT_S:
            raise ValueError(
                f"{value:g} s must stay below {COLLECTOR_REQUEST_TIMEOUT_S:g} s, the "
                "collector's request timeout, or the agent's answer arrives after the collector gave up"
            )
        return value

    @field_validator("allow_cidrs", "deny_cidrs")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or network") from None
        return value


def _refuse_unknown_keys(config_file: Path, values: dict[str, Any]) -> None:
    # A misspelt key would otherwise be ignored without a word: `interface = [...]` left
    # discovery on loopback, `heartbeat_intervall_s` the default.
    known = set(AgentSettings.model_fields)
    unknown = sorted(key for key in values if key not in known)
    if not unknown:
        return
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        problems.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"config file {config_file}: unknown setting {', '.join(problems)}")


def load_agent_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Load settings from ``config_file`` (TOML) if given, then the environment, then ``overrides``.

    Values in the file are defaults; ``MICBOARD_*`` variables win over them.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        check_config_file(config_file, what="agent config file")
        try:
            file_values = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        _refuse_unknown_keys(config_file, file_values)
    settings = load_settings(AgentSettings, **overrides)
    if not file_values:
        return settings
    # Environment beats file: only take file values for fields the environment left unset.
    explicit = settings.model_fields_set
    merged = {k: v for k, v in file_values.items() if k not in explicit}
    # The environment is the same as above: its unknown variables were reported then.
    return build_settings(AgentSettings, **{**merged, **overrides})
