"""Retention of the collector's records: resolved alerts, webhook deliveries, command outcomes.

History samples (``HistoryService.prune``) and dedup records (``SynchronizationService``) have
their own retention; these tables would otherwise grow for as long as the collector runs.
Alerts still open or acknowledged, and commands still pending, are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncConnection

from micboard.collector.store.schema_alerts import alerts, command_log, webhook_deliveries


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows of each table a prune deleted."""

    alerts: int
    webhook_deliveries: int
    commands: int

    @property
    def total(self) -> int:
        """All rows deleted."""
        return self.alerts + self.webhook_deliveries + self.commands


async def prune_records(conn: AsyncConnection, older_than_ms: int) -> Pruned:
    """Delete, in the caller's transaction, the records that ended before ``older_than_ms``."""
    # Opened before the cutoff too, so the (state, opened_ms) index narrows the search.
    resolved = await conn.execute(
        delete(alerts).where(
            alerts.c.state == "resolved",
            alerts.c.opened_ms < older_than_ms,
            alerts.c.resolved_ms < older_than_ms,
        )
    )
    deliveries = await conn.execute(
        delete(webhook_deliveries).where(webhook_deliveries.c.created_ms < older_than_ms)
    )
    commands = await conn.execute(
        delete(command_log).where(
            command_log.c.outcome != "pending", command_log.c.requested_ms < older_than_ms
        )
    )
    return Pruned(int(resolved.rowcount or 0), int(deliveries.rowcount or 0), int(commands.rowcount or 0))
