"""A channel's group/channel and battery type as columns, so that listing channels never reads device state.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Devices read per round trip while back-filling (bounded memory on a large fleet).
_BACKFILL_BATCH = 1000


def _text(value: Any) -> str | None:
    # What the model allows (short text); anything else in an old row reads as unknown.
    return value if isinstance(value, str) and len(value) <= 128 else None


def _details(state: Any) -> list[dict[str, Any]]:
    """``{"index", "group_channel", "battery_type"}`` of each channel in a stored device state."""
    if isinstance(state, str):
        try:
            state = json.loads(state)
        except ValueError:
            return []
    listed = state.get("channels") if isinstance(state, dict) else None
    if not isinstance(listed, list):
        return []
    found: dict[int, dict[str, Any]] = {}
    for channel in listed:
        if not isinstance(channel, dict) or not isinstance(channel.get("index"), int):
            continue
        tx = channel.get("transmitter")
        # The first entry of an index wins, as the listings read it before this revision.
        found.setdefault(
            channel["index"],
            {
                "index": channel["index"],
                "group_channel": _text(channel.get("group_channel")),
                "battery_type": _text(tx.get("battery_type")) if isinstance(tx, dict) else None,
            },
        )
    return list(found.values())


def upgrade() -> None:
    """Add ``channels.group_channel`` and ``channels.battery_type``, filled from each device's state."""
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("group_channel", sa.String(length=128)))
        batch.add_column(sa.Column("battery_type", sa.String(length=128)))
    bind = op.get_bind()
    devices = sa.table("devices", sa.column("id", sa.Integer), sa.column("state", sa.JSON))
    channels = sa.table(
        "channels",
        sa.column("device_pk", sa.Integer),
        sa.column("index", sa.Integer),
        sa.column("group_channel", sa.String),
        sa.column("battery_type", sa.String),
    )
    fill = (
        sa.update(channels)
        .where(channels.c.device_pk == sa.bindparam("pk"), channels.c.index == sa.bindparam("ix"))
        .values(group_channel=sa.bindparam("gc"), battery_type=sa.bindparam("bt"))
    )
    last = -1
    while True:
        rows = bind.execute(
            sa.select(devices.c.id, devices.c.state)
            .where(devices.c.id > last)
            .order_by(devices.c.id)
            .limit(_BACKFILL_BATCH)
        ).all()
        if not rows:
            return
        last = rows[-1][0]
        params = [
            {"pk": pk, "ix": d["index"], "gc": d["group_channel"], "bt": d["battery_type"]}
            for pk, state in rows
            for d in _details(state)
            if d["group_channel"] is not None or d["battery_type"] is not None
        ]
        if params:
            bind.execute(fill, params)


def downgrade() -> None:
    """Drop ``channels.group_channel`` and ``channels.battery_type``."""
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("battery_type")
        batch.drop_column("group_channel")
