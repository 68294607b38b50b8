"""The relational schema the services read and write."""

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
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

sites = Table(
    "sites",
    metadata,
    Column("site", String(64), primary_key=True),
    Column("first_seen_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("agent", String(64), primary_key=True),
    Column("site", String(64), ForeignKey("sites.site"), nullable=False, index=True),
    Column("boot", String(64), nullable=False),
    Column("version", String(64)),
    Column("hostname", String(255)),
    Column("status", String(16), nullable=False, default="online"),
    Column("heartbeat_interval_s", Float, nullable=False, default=10.0),
    Column("last_heartbeat_ms", BigInteger),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("outbox_depth", Integer, nullable=False, default=0),
    Column("dropped", BigInteger, nullable=False, default=0),
)

devices = Table(
    "devices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False),
    Column("agent", String(64), ForeignKey("agents.agent"), nullable=False),
    Column("device_key", String(128), nullable=False),
    Column("vendor", String(32), nullable=False),
    Column("family", String(32), nullable=False),
    Column("model", String(128)),
    Column("device_id", String(128)),
    Column("firmware", String(128)),
    Column("address", String(128)),
    Column("name", String(128)),
    Column("status", String(16), nullable=False),
    Column("state", JSON, nullable=False),
    # Where this state came from, to refuse older events: (boot, seq) within a boot, ts across boots.
    Column("last_boot", String(64), nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_ts", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    UniqueConstraint("agent", "device_key", name="uq_devices_agent_key"),
    Index("ix_devices_site_status", "site", "status"),
)

channels = Table(
    "channels",
    metadata,
    Column("device_pk", Integer, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("index", Integer, primary_key=True),
    Column("name", String(128)),
    Column("name_id", String(32)),
    Column("name_person", String(128)),
    Column("frequency_khz", Integer),
    Column("tx_present", Boolean, nullable=False, default=False),
    Column("tx_model", String(128)),
    Column("battery_bars", Integer),
    Column("battery_percent", Integer),
    Column("runtime_min", Integer),
    Column("tx_muted", Boolean),
)

applied_events = Table(
    "applied_events",
    metadata,
    Column("agent", String(64), primary_key=True),
    Column("boot", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("applied_ms", BigInteger, nullable=False, index=True),
)

poison_events = Table(
    "poison_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject", String(255), nullable=False),
    Column("code", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("received_ms", BigInteger, nullable=False, index=True),
)
