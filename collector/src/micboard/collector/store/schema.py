"""The relational schema the services read and write.

This module is the single import point of the schema: every table lives on :data:`metadata`,
and modules holding further tables (``schema_<area>.py``) are imported at the bottom so that
importing this module gives migrations and ``create_all`` the whole schema. A table added here
needs a migration in ``store/migrations/versions``.
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
    # "online", or "stale" when nothing arrived for 3 heartbeat intervals.
    Column("status", String(16), nullable=False, default="online"),
    Column("heartbeat_interval_s", Float, nullable=False, default=10.0),
    Column("last_heartbeat_ms", BigInteger),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("outbox_depth", Integer, nullable=False, default=0),
    Column("dropped", BigInteger, nullable=False, default=0),
    # The newest hello: its timestamp (the agent's clock) and when it was applied (ours). A device
    # the agent has not reported since (its last event older than the hello) is no longer
    # watched by it; see SynchronizationService.mark_unreported.
    Column("started_ms", BigInteger),
    Column("started_seen_ms", BigInteger),
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
    # What the desk sees: the agent's word ("online"/"offline"), or "stale" while the agent is silent.
    Column("status", String(16), nullable=False),
    # What the agent last reported, restored when a stale agent comes back.
    Column("reported_status", String(16), nullable=False),
    Column("state", JSON, nullable=False),
    # Where this state came from, to refuse older events: (boot, seq) within a boot, ts across boots.
    Column("last_boot", String(64), nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_ts", BigInteger, nullable=False),
    # Per-field versions within ``last_boot``, so that events applied out of order (two collectors
    # on one consumer) merge instead of losing a delta: a field's version is
    # ``field_seq[path]`` if present, else ``base_seq`` (the seq of the last full snapshot).
    Column("base_seq", BigInteger, nullable=False, default=0),
    Column("field_seq", JSON, nullable=False, default=dict),
    Column("updated_ms", BigInteger, nullable=False),
    # Bumped by every write of the columns above: a collector keeping a device's state in memory
    # between batches checks it before trusting its copy (another collector may have written).
    Column("revision", BigInteger, nullable=False, default=0, server_default="0"),
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
    # Copied out of the device's state so that listing channels never reads the state itself.
    Column("group_channel", String(128)),
    Column("battery_type", String(128)),
)

discovered = Table(
    "discovered",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("site", String(64), nullable=False),
    Column("agent", String(64), nullable=False),
    # device_id when the answer carried one, else "address:port": what makes two answers the same thing.
    Column("identity", String(200), nullable=False),
    Column("source", String(16), nullable=False),
    Column("address", String(128), nullable=False),
    Column("port", Integer),
    Column("vendor", String(32)),
    Column("family", String(32)),
    Column("model", String(128)),
    Column("device_id", String(128)),
    Column("name", String(128)),
    Column("supported", Boolean, nullable=False, default=False),
    Column("first_seen_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
    UniqueConstraint("agent", "identity", name="uq_discovered_agent_identity"),
    Index("ix_discovered_site", "site"),
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
    Column("stream_seq", BigInteger),  # JetStream stream sequence, to find the message again
    Column("deliveries", Integer),  # how often JetStream had delivered it when it was set aside
)

# Further tables live in modules of their own on the same ``metadata``; import them here,
# below everything they may reference, so that this module stays the one import point.
from micboard.collector.store import schema_alerts as _schema_alerts  # noqa: E402,F401 - registers alert/history tables
from micboard.collector.store import schema_api as _schema_api  # noqa: E402,F401 - registers API tables
