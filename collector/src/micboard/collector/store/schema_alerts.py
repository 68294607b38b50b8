"""Tables of alerts, alert rules, history samples, webhooks and the command log.

They are defined on the one :data:`micboard.collector.store.schema.metadata` so that
``create_all`` and the migrations see a single schema.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from micboard.collector.store.schema import metadata

#: States of an alert that is still in force (the partial unique index below keys on them).
ACTIVE_STATES = ("open", "acknowledged")
_ACTIVE_WHERE = text("state IN ('open', 'acknowledged')")

alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("device_key", String(128)),  # None for an alert about the agent itself
    Column("channel", Integer),  # None for an alert about a whole device or agent
    # "agent[/device_key[/channel]]": one non-null key, because NULLs never collide in a unique index.
    Column("target", String(256), nullable=False),
    Column("rule", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("value", Float),
    Column("opened_ms", BigInteger, nullable=False),
    # Last time the condition was seen true: "previously critical" ages out from here.
    Column("observed_ms", BigInteger, nullable=False),
    # Since when the condition has been seen clear; the alert resolves after the rule's hold time.
    Column("clear_since_ms", BigInteger),
    Column("acknowledged_by", String(128)),
    Column("acknowledged_ms", BigInteger),
    Column("resolved_by", String(128)),
    Column("resolved_ms", BigInteger),
    Column("updated_ms", BigInteger, nullable=False),
    # At most one alert in force per target and rule, even with several collectors evaluating.
    Index(
        "uq_alerts_active_target_rule",
        "target",
        "rule",
        unique=True,
        sqlite_where=_ACTIVE_WHERE,
        postgresql_where=_ACTIVE_WHERE,
    ),
    Index("ix_alerts_agent_device_state", "agent", "device_key", "state"),
    Index("ix_alerts_site_state", "site", "state"),
    Index("ix_alerts_state_opened", "state", "opened_ms"),
)

alert_rules = Table(
    "alert_rules",
    metadata,
    Column("site", String(64), primary_key=True),
    # Overrides of AlertThresholds fields; missing keys take the defaults.
    Column("thresholds", JSON, nullable=False),
    Column("updated_by", String(128)),
    Column("updated_ms", BigInteger, nullable=False),
)

history_samples = Table(
    "history_samples",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("device_key", String(128), nullable=False),
    Column("channel", Integer, nullable=False),
    Column("bucket_ms", BigInteger, nullable=False),
    # Aggregates over the bucket: the worst battery, the RF envelope, the loudest audio.
    Column("battery_percent", Integer),
    Column("battery_bars", Integer),
    Column("rf_dbm", Float),
    Column("rf_dbm_min", Float),
    Column("audio_dbfs", Float),
    Column("audio_peak_dbfs", Float),
    Column("samples", Integer, nullable=False, default=0),
    UniqueConstraint("agent", "device_key", "channel", "bucket_ms", name="uq_history_channel_bucket"),
    Index("ix_history_bucket", "bucket_ms"),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),
    # Kept as given: it is needed to sign. It is never logged nor returned by the API.
    Column("secret", Text, nullable=False),
    Column("events", JSON, nullable=False),  # event names to deliver; empty list = all
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_ms", BigInteger, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("webhook_id", Integer, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("delivery_id", String(64), nullable=False),
    Column("event", String(64), nullable=False),
    Column("alert_id", Integer),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Column("ok", Boolean, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Index("ix_webhook_deliveries_webhook", "webhook_id", "created_ms"),
    Index("ix_webhook_deliveries_delivery", "delivery_id"),
)

command_log = Table(
    "command_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("site", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("device_key", String(128), nullable=False),
    Column("channel", Integer),
    Column("action", String(16), nullable=False),
    Column("value", String(128)),
    Column("requested_by", String(128)),
    Column("outcome", String(32), nullable=False),  # "pending" until the reply (or its absence)
    Column("detail", Text),
    Column("requested_ms", BigInteger, nullable=False),
    Column("completed_ms", BigInteger),
    Index("ix_command_log_device", "agent", "device_key", "requested_ms"),
)
