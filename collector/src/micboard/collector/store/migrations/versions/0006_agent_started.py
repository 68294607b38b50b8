"""When each agent last started (its newest hello), to tell which devices it no longer reports.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``agents.started_ms`` and ``agents.started_seen_ms`` (unknown until the next hello)."""
    # Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns too): a batch-mode copy
    # of ``agents`` would have to drop the table the devices' foreign keys point at.
    op.add_column("agents", sa.Column("started_ms", sa.BigInteger()))
    op.add_column("agents", sa.Column("started_seen_ms", sa.BigInteger()))


def downgrade() -> None:
    """Drop ``agents.started_ms`` and ``agents.started_seen_ms``."""
    op.drop_column("agents", "started_seen_ms")
    op.drop_column("agents", "started_ms")
