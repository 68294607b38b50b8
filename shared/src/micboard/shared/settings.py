"""Settings base: environment variables with the ``MICBOARD_`` prefix and an optional ``.env``."""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, DotEnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from micboard.shared.errors import ConfigError
from micboard.shared.secret_files import check_config_file

log = logging.getLogger(__name__)

_SettingsT = TypeVar("_SettingsT", bound="MicboardSettings")

NOT_SETTINGS: frozenset[str] = frozenset(
    {
        # Options of deploy/pi/install.sh and deploy/collector/install.sh.
        "MICBOARD_PREFIX",
        "MICBOARD_CONFIG_DIR",
        "MICBOARD_UNIT_DIR",
        # The test suite's services and tools (tests/conftest.py, tests/browser/conftest.py, CI).
        "MICBOARD_TEST_PG_DSN",
        "MICBOARD_TEST_NATS_URL",
        "MICBOARD_TEST_CHROMIUM",
    }
)
"""``MICBOARD_*`` variables that are not settings but are read by scripts and the test suite.

They may sit in the environment of a program on purpose, so loading settings never calls them unknown.
"""


def _listed(value: Any) -> Any:
    """A list setting given as text (an environment variable): JSON, or items separated by commas."""
    if not isinstance(value, str):
        return value  # a list from a config file, or whatever validation will refuse
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON list ({exc}); or give the items separated by commas") from None
    return [item.strip() for item in text.split(",") if item.strip()]


StrList = Annotated[list[str], NoDecode, BeforeValidator(_listed)]
"""A list of strings that an environment variable gives as ``a,b`` or as JSON ``["a","b"]``."""

FloatList = Annotated[list[float], NoDecode, BeforeValidator(_listed)]
"""A list of numbers that an environment variable gives as ``60,120`` or as JSON ``[60,120]``."""


class MicboardSettings(BaseSettings):
    """Settings common to every micboard process; each program extends it with its own."""

    model_config = SettingsConfigDict(
        env_prefix="MICBOARD_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["kv", "json"] = "kv"
    state_dir: Path = Field(default=Path("state"), description="where files that must persist live")
    nats_url: str | None = Field(
        default=None, description="NATS server URL; unset means start an embedded nats-server"
    )
    max_message_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)


def _variable_names(cls: type[MicboardSettings]) -> set[str]:
    """Names of the environment variables and of the variables in ``cls``'s ``.env`` file(s)."""
    # The .env is read the way pydantic-settings reads it (same files, same parser), keeping the
    # case of each name so that the warning names the variable as it is written.
    in_env_file = DotEnvSettingsSource(cls, case_sensitive=True).env_vars
    return {*os.environ, *in_env_file}


#: The settings of the agent alone and of the collector alone, by field name, for
#: :func:`unknown_variables`: a variable the other program reads is not unknown. Written out
#: because shared imports neither program (the collector's settings import SQLAlchemy); a unit
#: test (tests/unit/shared/test_settings_program_names.py) keeps them equal to the programs'
#: settings classes.
AGENT_SETTINGS: frozenset[str] = frozenset(
    {
        "agent", "allow_cidrs", "command_timeout_s", "connect_timeout_s", "deny_cidrs",
        "discovery_mdns", "discovery_slp", "driver_command_timeout_s", "extra_service_types",
        "heartbeat_interval_s", "interfaces", "max_in_flight", "mdns_service_types",
        "meter_interval_ms", "meter_rate_hz", "metrics_host", "metrics_port",
        "nats_connect_timeout_s", "nats_creds_file", "nats_inbox_prefix",
        "nats_max_outstanding_pings", "nats_nkey_seed_file", "nats_ping_interval_s",
        "nats_require_tls", "nats_tls_ca", "nats_tls_cert", "nats_tls_hostname", "nats_tls_key",
        "outbox_fsync_interval_s", "outbox_max_age_s", "outbox_max_bytes", "poll_interval_s",
        "publish_timeout_s", "reconnect_backoff_initial_s", "reconnect_backoff_max_s",
        "shutdown_timeout_s", "silence_timeout_s", "site", "snapshot_interval_s", "static_devices",
    }
)  # fmt: skip
COLLECTOR_SETTINGS: frozenset[str] = frozenset(
    {
        "ack_wait_s", "alert_clip_resolve_hold_s", "alert_resolve_hold_s", "alert_rf_loss_s",
        "alert_sweep_interval_s", "auth_failures_per_min", "auto_migrate", "batch_size",
        "bootstrap_token", "database_url", "dedup_prune_interval_s", "dedup_retention_s",
        "duplicate_window_s", "durable_name", "fetch_timeout_s", "history_bucket_s",
        "history_flush_interval_s", "history_prune_interval_s", "history_retention_days",
        "http_host", "http_port", "http_shutdown_timeout_s", "ingest", "live_bridge",
        "live_meter_hz", "live_queue_messages", "max_deliver", "nats_creds_file",
        "nats_inbox_prefix", "nats_nkey_seed_file", "nats_require_tls", "nats_server_bin",
        "nats_tls_ca", "nats_tls_cert", "nats_tls_hostname", "nats_tls_key",
        "records_retention_days", "redelivery_backoff_s", "retry_delay_s", "retry_max_delay_s",
        "sqlite_checkpoint_interval_s", "stale_check_interval_s", "stream_max_age_s",
        "stream_max_bytes", "stream_name", "stream_replicas", "tune_gc",
        "unreported_device_after_s",
    }
)  # fmt: skip


def _other_programs_fields() -> frozenset[str]:
    """The settings of the agent and of the collector, whether or not each is installed here.

    One environment (the demo, a ``.env`` made from ``.env.example``) may hold both programs'
    settings: a variable the other program reads is not unknown.
    """
    return AGENT_SETTINGS | COLLECTOR_SETTINGS


def unknown_variables(cls: type[MicboardSettings]) -> list[tuple[str, str | None]]:
    """The ``MICBOARD_*`` variables (environment, ``.env``) naming no setting, with the likeliest one meant.

    No setting of ``cls``, nor of the other micboard program (:data:`AGENT_SETTINGS`,
    :data:`COLLECTOR_SETTINGS`), nor one of :data:`NOT_SETTINGS`.
    """
    return _unknown_variables(cls, _variable_names(cls))


def _unknown_variables(cls: type[MicboardSettings], names: set[str]) -> list[tuple[str, str | None]]:
    """Each of ``names`` that has ``cls``'s prefix but names no field of it, with the likeliest one meant."""
    prefix = cls.model_config.get("env_prefix", "").upper()
    delimiter = cls.model_config.get("env_nested_delimiter") or None
    elsewhere = _other_programs_fields()
    # The setting meant may be the other program's: a misspelling there is as easy to make.
    fields = sorted(set(cls.model_fields) | elsewhere)
    unknown = []
    for name in sorted(names):
        # pydantic-settings matches names without regard to case (case_sensitive is not set).
        upper = name.upper()
        if not prefix or not upper.startswith(prefix) or upper in NOT_SETTINGS:
            continue
        # MICBOARD_<FIELD>__<KEY> sets a key of a nested setting: the field part is what must exist.
        rest = upper[len(prefix) :]
        field = (rest.split(delimiter, 1)[0] if delimiter else rest).lower()
        if field in cls.model_fields or field in elsewhere:
            continue
        # Matched without the prefix, which every name shares and which would make any two alike.
        close = difflib.get_close_matches(field, fields, n=1)
        unknown.append((name, f"{prefix}{close[0].upper()}" if close else None))
    return unknown


def _warn_unknown_variables(cls: type[MicboardSettings]) -> None:
    # extra="ignore" lets a variable meant for the other program share an environment file with
    # this one's, but it also drops a misspelt name without a word (MICBOARD_NATS_ULR left the
    # agent on 127.0.0.1). Each such name gets a warning; refusing would stop a process over a
    # variable that another program reads.
    for name, suggestion in unknown_variables(cls):
        if suggestion:
            log.warning("unknown setting %s ignored; did you mean %s?", name, suggestion)
        else:
            log.warning("unknown setting %s ignored", name)


def load_settings(cls: type[_SettingsT], **overrides: Any) -> _SettingsT:
    """Build settings from the environment and ``overrides``, turning errors into :class:`ConfigError`.

    Every ``MICBOARD_*`` variable (environment or ``.env``) that names no setting of ``cls``, and
    is not one of :data:`NOT_SETTINGS`, is logged as a warning, once per call.
    """
    _check_env_file(cls)
    # Before building: a misspelt name is worth knowing about when the settings are refused too.
    _warn_unknown_variables(cls)
    return _build(cls, overrides)


def build_settings(cls: type[_SettingsT], **overrides: Any) -> _SettingsT:
    """:func:`load_settings` without the warnings, for a second build from the same environment."""
    _check_env_file(cls)
    return _build(cls, overrides)


#: The environment file of each program's systemd unit (``EnvironmentFile=`` in systemd/*.service),
#: by settings class. systemd reads it, not the program, so it is checked here by its known path:
#: one the service's user cannot read is not world-readable, which is all this check is about.
SERVICE_ENV_FILES: dict[str, Path] = {
    "AgentSettings": Path("/etc/micboard/agent.env"),
    "CollectorSettings": Path("/etc/micboard/collector.env"),
}


def _check_env_file(cls: type[MicboardSettings] | None = None) -> None:
    # A .env may hold passwords or tokens: refuse it when world-readable.
    check_config_file(Path(".env"), what=".env file")
    service_file = SERVICE_ENV_FILES.get(cls.__name__) if cls is not None else None
    if service_file is None:
        return
    try:
        check_config_file(service_file, what="service environment file")
    except ConfigError:
        if service_file.exists() and not os.access(service_file, os.R_OK):
            return  # unreadable to this user: not readable by everyone either
        raise


def _build(cls: type[_SettingsT], overrides: dict[str, Any]) -> _SettingsT:
    try:
        return cls(**overrides)
    except SettingsError as exc:
        # A value pydantic-settings could not parse (a structured setting that is not JSON).
        raise ConfigError(f"invalid settings: {exc}") from None
    except ValidationError as exc:
        # A check across fields has no location: its message names the fields itself.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
