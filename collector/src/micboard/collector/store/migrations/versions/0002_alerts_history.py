"""Alerts, per-site alert rules, history samples, webhooks and their deliveries, the command log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE_WHERE = sa.text("state IN ('open', 'acknowledged')")


def upgrade() -> None:
    """Create the alert, history, webhook and command tables."""
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("device_key", sa.String(128)),
        sa.Column("channel", sa.Integer()),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("value", sa.Float()),
        sa.Column("opened_ms", sa.BigInteger(), nullable=False),
        sa.Column("observed_ms", sa.BigInteger(), nullable=False),
        sa.Column("clear_since_ms", sa.BigInteger()),
        sa.Column("acknowledged_by", sa.String(128)),
        sa.Column("acknowledged_ms", sa.BigInteger()),
        sa.Column("resolved_by", sa.String(128)),
        sa.Column("resolved_ms", sa.BigInteger()),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "uq_alerts_active_target_rule",
        "alerts",
        ["target", "rule"],
        unique=True,
        sqlite_where=_ACTIVE_WHERE,
        postgresql_where=_ACTIVE_WHERE,
    )
    op.create_index("ix_alerts_agent_device_state", "alerts", ["agent", "device_key", "state"])
    op.create_index("ix_alerts_site_state", "alerts", ["site", "state"])
    op.create_index("ix_alerts_state_opened", "alerts", ["state", "opened_ms"])

    op.create_table(
        "alert_rules",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.String(128)),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
    )

    op.create_table(
        "history_samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("device_key", sa.String(128), nullable=False),
        sa.Column("channel", sa.Integer(), nullable=False),
        sa.Column("bucket_ms", sa.BigInteger(), nullable=False),
        sa.Column("battery_percent", sa.Integer()),
        sa.Column("battery_bars", sa.Integer()),
        sa.Column("rf_dbm", sa.Float()),
        sa.Column("rf_dbm_min", sa.Float()),
        sa.Column("audio_dbfs", sa.Float()),
        sa.Column("audio_peak_dbfs", sa.Float()),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.UniqueConstraint("agent", "device_key", "channel", "bucket_ms", name="uq_history_channel_bucket"),
    )
    op.create_index("ix_history_bucket", "history_samples", ["bucket_ms"])

    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "webhook_id", sa.Integer(), sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("delivery_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("alert_id", sa.Integer()),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_webhook_deliveries_webhook", "webhook_deliveries", ["webhook_id", "created_ms"])
    op.create_index("ix_webhook_deliveries_delivery", "webhook_deliveries", ["delivery_id"])

    op.create_table(
        "command_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("device_key", sa.String(128), nullable=False),
        sa.Column("channel", sa.Integer()),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("value", sa.String(128)),
        sa.Column("requested_by", sa.String(128)),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text()),
        sa.Column("requested_ms", sa.BigInteger(), nullable=False),
        sa.Column("completed_ms", sa.BigInteger()),
    )
    op.create_index("ix_command_log_device", "command_log", ["agent", "device_key", "requested_ms"])


def downgrade() -> None:
    """Drop the alert, history, webhook and command tables."""
    op.drop_table("command_log")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_table("history_samples")
    op.drop_table("alert_rules")
    op.drop_table("alerts")
