"""Retention of resolved alerts, webhook deliveries and command outcomes, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.store.retention import prune_records
from micboard.collector.store.schema_alerts import alerts, command_log, webhook_deliveries, webhooks

CUTOFF = 1_000_000_000_000
OLD, NEW = CUTOFF - 1, CUTOFF + 1


def alert(target: str, state: str, opened_ms: int, resolved_ms: int | None) -> dict[str, Any]:
    return {
        "site": "venue", "agent": "pi-1", "device_key": "rx", "channel": 1, "target": target,
        "rule": "battery_low", "severity": "warning", "state": state, "message": "m",
        "opened_ms": opened_ms, "observed_ms": opened_ms, "resolved_ms": resolved_ms,
        "resolved_by": "system" if resolved_ms else None, "updated_ms": opened_ms,
    }  # fmt: skip


def command(request_id: str, outcome: str, requested_ms: int) -> dict[str, Any]:
    return {
        "request_id": request_id, "site": "venue", "agent": "pi-1", "device_key": "rx",
        "action": "identify", "outcome": outcome, "requested_ms": requested_ms,
    }  # fmt: skip


async def test_records_that_ended_before_the_cutoff_are_deleted_and_nothing_in_force(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(alerts),
            [
                alert("pi-1/rx/1", "resolved", OLD - 10, OLD),  # over long ago: goes
                alert("pi-1/rx/2", "resolved", OLD - 10, NEW),  # resolved lately: stays
                alert("pi-1/rx/3", "open", OLD - 10, None),  # still in force: stays
                alert("pi-1/rx/4", "acknowledged", OLD - 10, None),
            ],
        )
        hook = (
            await conn.execute(
                insert(webhooks)
                .values(url="http://127.0.0.1:9/h", secret="s", events=[], enabled=True, created_ms=OLD)
                .returning(webhooks.c.id)
            )
        ).scalar_one()
        await conn.execute(
            insert(webhook_deliveries),
            [
                {"webhook_id": hook, "delivery_id": d, "event": "alert.opened", "attempt": 1, "ok": True,
                 "duration_ms": 1, "created_ms": at}
                for d, at in (("old", OLD), ("new", NEW))
            ],
        )  # fmt: skip
        await conn.execute(
            insert(command_log),
            [
                command("done-old", "ok", OLD),
                command("pending-old", "pending", OLD),
                command("done-new", "ok", NEW),
            ],
        )
    async with engine.begin() as conn:
        pruned = await prune_records(conn, CUTOFF)
    assert (pruned.alerts, pruned.webhook_deliveries, pruned.commands, pruned.total) == (1, 1, 1, 3)
    async with engine.connect() as conn:
        left_alerts = set((await conn.execute(select(alerts.c.target))).scalars())
        left_deliveries = set((await conn.execute(select(webhook_deliveries.c.delivery_id))).scalars())
        left_commands = set((await conn.execute(select(command_log.c.request_id))).scalars())
        hooks = (await conn.execute(select(func.count()).select_from(webhooks))).scalar_one()
    assert left_alerts == {"pi-1/rx/2", "pi-1/rx/3", "pi-1/rx/4"}
    assert left_deliveries == {"new"}
    assert left_commands == {"pending-old", "done-new"}
    assert hooks == 1  # the webhooks themselves are configuration, never pruned
    async with engine.begin() as conn:
        assert (await prune_records(conn, CUTOFF)).total == 0
