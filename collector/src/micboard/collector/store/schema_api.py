"""Tables of the HTTP API: hashed API tokens and the channel groups users arrange.

Defined on the one :data:`micboard.collector.store.schema.metadata` so that ``create_all`` and
the migrations see a single schema.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Column, Index, Integer, String, Table

from micboard.collector.store.schema import metadata

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    # sha256 hex of the token: the token itself is shown once and never stored.
    Column("hash", String(64), nullable=False, unique=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("last_used_ms", BigInteger),
    Column("revoked", Boolean, nullable=False, default=False),
)

groups = Table(
    "groups",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("site", String(64)),
    # [{"device_id": int, "index": int}, ...] in the order the user arranged them.
    Column("channels", JSON, nullable=False),
    Column("position", Integer, nullable=False, default=0),
    Column("updated_ms", BigInteger, nullable=False),
    Index("ix_groups_position", "position", "id"),
)
