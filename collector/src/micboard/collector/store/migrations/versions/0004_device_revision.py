"""A revision counter on devices, so that a collector can keep device state in memory between batches.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``devices.revision`` (0 for existing rows)."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    """Drop ``devices.revision``."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("revision")
