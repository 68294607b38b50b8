"""SynchronizationService: apply agent events to the store, idempotently and in order."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from micboard.collector.store.schema import agents, applied_events, channels, devices, sites
from micboard.shared.envelope import (
    AnyEvent,
    DeviceEvent,
    DiscoveredEvent,
    HeartbeatEvent,
    HelloEvent,
    OfflineEvent,
)
from micboard.shared.model import Device, apply_changes

log = logging.getLogger(__name__)


class ApplyOutcome(StrEnum):
    """What applying one event did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # (agent, boot, seq) seen before: a no-op
    OUTDATED = "outdated"  # older than the state already applied for that device
    IGNORED = "ignored"  # a kind this service does not store
    REJECTED = "rejected"  # valid on the wire but inconsistent with what is stored


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The typed result of :meth:`SynchronizationService.apply`."""

    outcome: ApplyOutcome
    detail: str | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SynchronizationService:
    """Applies hello, heartbeat, device, offline and discovered events inside a caller's transaction."""

    async def apply(self, conn: AsyncConnection, event: AnyEvent) -> ApplyResult:
        """Apply one event; the caller owns the transaction (ingest applies a batch in one)."""
        if isinstance(event, HelloEvent | HeartbeatEvent | DeviceEvent | OfflineEvent | DiscoveredEvent):
            if await self._seen(conn, event):
                return ApplyResult(ApplyOutcome.DUPLICATE)
            await conn.execute(
                insert(applied_events).values(
                    agent=event.agent, boot=event.boot, seq=event.seq, applied_ms=_now_ms()
                )
            )
            await self._touch_agent(conn, event)
        if isinstance(event, DeviceEvent):
            return await self._apply_device(conn, event)
        if isinstance(event, OfflineEvent):
            return await self._apply_offline(conn, event)
        if isinstance(event, HelloEvent | HeartbeatEvent):
            return ApplyResult(ApplyOutcome.APPLIED)
        return ApplyResult(ApplyOutcome.IGNORED, f"{event.kind} events are not stored")

    async def _seen(self, conn: AsyncConnection, event: AnyEvent) -> bool:
        found = await conn.execute(
            select(applied_events.c.seq).where(
                applied_events.c.agent == event.agent,
                applied_events.c.boot == event.boot,
                applied_events.c.seq == event.seq,
            )
        )
        return found.first() is not None

    async def _touch_agent(self, conn: AsyncConnection, event: AnyEvent) -> None:
        now = _now_ms()
        site_row = await conn.execute(select(sites.c.site).where(sites.c.site == event.site))
        if site_row.first() is None:
            await conn.execute(insert(sites).values(site=event.site, first_seen_ms=now, last_seen_ms=now))
        else:
            await conn.execute(update(sites).where(sites.c.site == event.site).values(last_seen_ms=now))
        values: dict[str, Any] = {"site": event.site, "last_seen_ms": now, "status": "online"}
        if isinstance(event, HelloEvent):
            values.update(boot=event.boot, version=event.body.version, hostname=event.body.hostname)
        if isinstance(event, HeartbeatEvent):
            values.update(
                boot=event.boot,
                last_heartbeat_ms=now,
                heartbeat_interval_s=event.body.interval_s,
                outbox_depth=event.body.outbox_depth,
                dropped=event.body.dropped,
            )
        agent_row = await conn.execute(select(agents.c.agent).where(agents.c.agent == event.agent))
        if agent_row.first() is None:
            values.setdefault("boot", event.boot)
            await conn.execute(insert(agents).values(agent=event.agent, **values))
        else:
            await conn.execute(update(agents).where(agents.c.agent == event.agent).values(**values))

    async def _device_row(self, conn: AsyncConnection, agent: str, key: str) -> Any:
        result = await conn.execute(
            select(devices).where(devices.c.agent == agent, devices.c.device_key == key)
        )
        return result.first()

    @staticmethod
    def _is_older(row: Any, event: AnyEvent) -> bool:
        if row.last_boot == event.boot:
            return bool(event.seq < row.last_seq)
        return bool(event.ts < row.last_ts)

    async def _apply_device(self, conn: AsyncConnection, event: DeviceEvent) -> ApplyResult:
        body = event.body
        row = await self._device_row(conn, event.agent, body.device_key)
        if row is not None and self._is_older(row, event):
            return ApplyResult(ApplyOutcome.OUTDATED)
        if body.snapshot is not None:
            device = body.snapshot
        elif row is None:
            return ApplyResult(ApplyOutcome.REJECTED, f"delta for unknown device {body.device_key!r}")
        else:
            try:
                device = apply_changes(Device.model_validate(row.state), body.changes or {})
            except ValidationError as exc:
                return ApplyResult(ApplyOutcome.REJECTED, f"delta does not apply: {exc.error_count()} errors")
        values: dict[str, Any] = {
            "site": event.site,
            "vendor": device.vendor.value,
            "family": device.family.value,
            "model": device.model,
            "device_id": device.device_id,
            "firmware": device.firmware,
            "address": device.address,
            "name": device.name,
            "status": "online",
            "state": device.model_dump(mode="json"),
            "last_boot": event.boot,
            "last_seq": event.seq,
            "last_ts": event.ts,
            "updated_ms": _now_ms(),
        }
        if row is None:
            result = await conn.execute(
                insert(devices).values(agent=event.agent, device_key=body.device_key, **values)
            )
            device_pk = result.inserted_primary_key[0] if result.inserted_primary_key else None
            if device_pk is None:  # pragma: no cover - every supported backend returns it
                device_pk = (await self._device_row(conn, event.agent, body.device_key)).id
        else:
            device_pk = row.id
            await conn.execute(update(devices).where(devices.c.id == device_pk).values(**values))
        await self._write_channels(conn, device_pk, device)
        return ApplyResult(ApplyOutcome.APPLIED)

    async def _write_channels(self, conn: AsyncConnection, device_pk: int, device: Device) -> None:
        await conn.execute(delete(channels).where(channels.c.device_pk == device_pk))
        rows = []
        for channel in device.channels:
            tx = channel.transmitter
            rows.append(
                {
                    "device_pk": device_pk,
                    "index": channel.index,
                    "name": channel.name,
                    "name_id": channel.name_id,
                    "name_person": channel.name_person,
                    "frequency_khz": channel.frequency_khz,
                    "tx_present": tx is not None,
                    "tx_model": tx.model if tx else None,
                    "battery_bars": tx.battery_bars if tx else None,
                    "battery_percent": tx.battery_percent if tx else None,
                    "runtime_min": tx.runtime_min if tx else None,
                    "tx_muted": tx.muted if tx else None,
                }
            )
        if rows:
            await conn.execute(insert(channels), rows)

    async def _apply_offline(self, conn: AsyncConnection, event: OfflineEvent) -> ApplyResult:
        row = await self._device_row(conn, event.agent, event.body.device_key)
        if row is None:
            return ApplyResult(ApplyOutcome.REJECTED, f"offline for unknown device {event.body.device_key!r}")
        if self._is_older(row, event):
            return ApplyResult(ApplyOutcome.OUTDATED)
        await conn.execute(
            update(devices)
            .where(devices.c.id == row.id)
            .values(
                status="offline",
                last_boot=event.boot,
                last_seq=event.seq,
                last_ts=event.ts,
                updated_ms=_now_ms(),
            )
        )
        return ApplyResult(ApplyOutcome.APPLIED)
