"""The initial schema: sites, agents, devices, channels, discovered, applied and poison events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the tables of the first release."""
    op.create_table(
        "sites",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("agent", sa.String(64), primary_key=True),
        sa.Column("site", sa.String(64), sa.ForeignKey("sites.site"), nullable=False),
        sa.Column("boot", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64)),
        sa.Column("hostname", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("heartbeat_interval_s", sa.Float(), nullable=False),
        sa.Column("last_heartbeat_ms", sa.BigInteger()),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("outbox_depth", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_agents_site", "agents", ["site"])
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), sa.ForeignKey("agents.agent"), nullable=False),
        sa.Column("device_key", sa.String(128), nullable=False),
        sa.Column("vendor", sa.String(32), nullable=False),
        sa.Column("family", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("device_id", sa.String(128)),
        sa.Column("firmware", sa.String(128)),
        sa.Column("address", sa.String(128)),
        sa.Column("name", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reported_status", sa.String(16), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("last_boot", sa.String(64), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=False),
        sa.Column("base_seq", sa.BigInteger(), nullable=False),
        sa.Column("field_seq", sa.JSON(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("agent", "device_key", name="uq_devices_agent_key"),
    )
    op.create_index("ix_devices_site_status", "devices", ["site", "status"])
    op.create_table(
        "channels",
        sa.Column(
            "device_pk", sa.Integer(), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("name_id", sa.String(32)),
        sa.Column("name_person", sa.String(128)),
        sa.Column("frequency_khz", sa.Integer()),
        sa.Column("tx_present", sa.Boolean(), nullable=False),
        sa.Column("tx_model", sa.String(128)),
        sa.Column("battery_bars", sa.Integer()),
        sa.Column("battery_percent", sa.Integer()),
        sa.Column("runtime_min", sa.Integer()),
        sa.Column("tx_muted", sa.Boolean()),
    )
    op.create_table(
        "discovered",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("identity", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("address", sa.String(128), nullable=False),
        sa.Column("port", sa.Integer()),
        sa.Column("vendor", sa.String(32)),
        sa.Column("family", sa.String(32)),
        sa.Column("model", sa.String(128)),
        sa.Column("device_id", sa.String(128)),
        sa.Column("name", sa.String(128)),
        sa.Column("supported", sa.Boolean(), nullable=False),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("agent", "identity", name="uq_discovered_agent_identity"),
    )
    op.create_index("ix_discovered_site", "discovered", ["site"])
    op.create_table(
        "applied_events",
        sa.Column("agent", sa.String(64), primary_key=True),
        sa.Column("boot", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("applied_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_applied_events_applied_ms", "applied_events", ["applied_ms"])
    op.create_table(
        "poison_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("received_ms", sa.BigInteger(), nullable=False),
        sa.Column("stream_seq", sa.BigInteger()),
        sa.Column("deliveries", sa.Integer()),
    )
    op.create_index("ix_poison_events_received_ms", "poison_events", ["received_ms"])


def downgrade() -> None:
    """Drop every table of the first release."""
    for table in ("poison_events", "applied_events", "discovered", "channels", "devices", "agents", "sites"):
        op.drop_table(table)
