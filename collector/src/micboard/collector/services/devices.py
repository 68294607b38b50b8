"""DeviceService: read devices, send commands to their agents, forget the ones taken away."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from micboard.collector.errors import (
    AgentNotFoundError,
    AgentStillReportingError,
    CommandUnavailableError,
    DeviceIdNotFoundError,
    DeviceStillReportedError,
)
from micboard.collector.services.commands import CommandReceipt, CommandService
from micboard.collector.store.database import write_turn
from micboard.collector.store.schema import agents, channels, devices, discovered, sites
from micboard.collector.store.schema_api import groups

if TYPE_CHECKING:
    from micboard.collector.services.alerts import AlertChange, AlertService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """Filters of a device listing; ``None`` means no filter."""

    site: str | None = None
    status: str | None = None
    vendor: str | None = None


@dataclass(frozen=True, slots=True)
class ForgottenDevice:
    """A device :meth:`DeviceService.forget` removed, and the alerts it resolved with it."""

    device_id: int
    site: str
    agent: str
    device_key: str
    alerts: list[AlertChange] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ForgottenAgent:
    """An agent :meth:`DeviceService.forget_agent` removed, with its devices and the alerts it resolved."""

    site: str
    agent: str
    devices: list[ForgottenDevice]
    alerts: list[AlertChange] = field(default_factory=list)
    site_removed: bool = False  # it was the site's last agent


async def _delete_devices(conn: AsyncConnection, ids: list[int], now: int) -> None:
    """Delete devices ``ids``, their channels and their places in groups."""
    if not ids:
        return
    # Explicitly, not by the foreign key's cascade: SQLite enforces it only per connection.
    await conn.execute(delete(channels).where(channels.c.device_pk.in_(ids)))
    await conn.execute(delete(devices).where(devices.c.id.in_(ids)))
    # Out of the groups too: SQLite may give an id to the next new device, whose channels
    # would otherwise take the forgotten one's places in them.
    gone = set(ids)
    for group_id, listed in (await conn.execute(select(groups.c.id, groups.c.channels))).all():
        kept = [c for c in listed or () if c.get("device_id") not in gone]
        if len(kept) != len(listed or ()):
            await conn.execute(
                update(groups).where(groups.c.id == group_id).values(channels=kept, updated_ms=now)
            )


class DeviceService:
    """Reads devices from the store, sends them commands through their agents, forgets them."""

    def __init__(self, engine: AsyncEngine, commands: CommandService | None = None) -> None:
        self.engine = engine
        self.commands = commands

    def _commands(self) -> CommandService:
        if self.commands is None:
            raise CommandUnavailableError()
        return self.commands

    async def rename(
        self, agent: str, device_key: str, channel: int | None, name: str, *, by: str | None = None
    ) -> CommandReceipt:
        """Ask the owning agent to rename a channel (or the device); the store changes on confirmation."""
        return await self._commands().rename(agent, device_key, channel, name, requested_by=by)

    async def identify(
        self, agent: str, device_key: str, channel: int | None = None, *, by: str | None = None
    ) -> CommandReceipt:
        """Ask the owning agent to make a channel (or the device) identify itself."""
        return await self._commands().identify(agent, device_key, channel, requested_by=by)

    async def mute(
        self, agent: str, device_key: str, channel: int, muted: bool = True, *, by: str | None = None
    ) -> CommandReceipt:
        """Ask the owning agent to mute (or unmute) a channel's transmitter."""
        commands = self._commands()
        if muted:
            return await commands.mute(agent, device_key, channel, requested_by=by)
        return await commands.unmute(agent, device_key, channel, requested_by=by)

    async def list_devices(self, filters: DeviceFilter | None = None) -> list[dict[str, Any]]:
        """Devices matching ``filters`` with their full normalized state, in one query."""
        filters = filters or DeviceFilter()
        query = select(devices).order_by(devices.c.site, devices.c.agent, devices.c.device_key)
        if filters.site is not None:
            query = query.where(devices.c.site == filters.site)
        if filters.status is not None:
            query = query.where(devices.c.status == filters.status)
        if filters.vendor is not None:
            query = query.where(devices.c.vendor == filters.vendor)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            {
                "site": row["site"],
                "agent": row["agent"],
                "device_key": row["device_key"],
                "status": row["status"],
                "updated_ms": row["updated_ms"],
                "device": row["state"],
            }
            for row in rows
        ]

    async def forget(self, device_id: int, *, by: str, alerts: AlertService | None = None) -> ForgottenDevice:
        """Remove a receiver that is no longer watched: its row and channels; its alerts resolve.

        Only a device shown offline or stale: one its agent reports online would be back with
        the agent's next snapshot (:class:`DeviceStillReportedError`). Its channels leave the
        groups they were arranged in. Its history stays until retention removes it, and a
        device of the same key reported later starts afresh. The caller tells live views (and
        ``alerts`` subscribers, via :meth:`AlertService.notify`).
        """
        now = time.time_ns() // 1_000_000
        async with write_turn(self.engine), self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(devices.c.site, devices.c.agent, devices.c.device_key, devices.c.status)
                    .where(devices.c.id == device_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise DeviceIdNotFoundError(device_id)
            if row.status == "online":
                raise DeviceStillReportedError(device_id, row.device_key, row.agent)
            resolved = (
                await alerts.resolve_forgotten(conn, row.agent, row.device_key, by=by, now_ms=now)
                if alerts is not None
                else []
            )
            await _delete_devices(conn, [device_id], now)
        log.warning(
            "device forgotten",
            extra={"device_id": device_id, "agent": row.agent, "device_key": row.device_key, "by": by},
        )
        return ForgottenDevice(device_id, row.site, row.agent, row.device_key, resolved)

    async def forget_agent(
        self, agent: str, *, by: str, alerts: AlertService | None = None
    ) -> ForgottenAgent:
        """Remove an agent gone for good (a venue retired): its devices, what it discovered, its alerts.

        Only an agent that is not heard (shown stale): one that is would be back with its next
        heartbeat (:class:`AgentStillReportingError`). Its site goes with its last agent; its
        history stays until retention removes it; its NATS identity is revoked separately
        (``micboard-collector agent revoke``). The caller tells live views and alert subscribers.
        """
        now = time.time_ns() // 1_000_000
        async with write_turn(self.engine), self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(agents.c.site, agents.c.status).where(agents.c.agent == agent).with_for_update()
                )
            ).first()
            if row is None:
                raise AgentNotFoundError(agent)
            if row.status == "online":
                raise AgentStillReportingError(agent)
            listed = (
                await conn.execute(
                    select(devices.c.id, devices.c.site, devices.c.device_key)
                    .where(devices.c.agent == agent)
                    .order_by(devices.c.id)
                    .with_for_update()
                )
            ).all()
            resolved = (
                await alerts.resolve_forgotten(conn, agent, by=by, now_ms=now) if alerts is not None else []
            )
            await _delete_devices(conn, [d.id for d in listed], now)
            await conn.execute(delete(discovered).where(discovered.c.agent == agent))
            await conn.execute(delete(agents).where(agents.c.agent == agent))
            # Its site's last agent: nothing is left to show of the site.
            others = select(agents.c.agent).where(agents.c.site == row.site).exists()
            site_removed = bool(
                (await conn.execute(delete(sites).where(sites.c.site == row.site, ~others))).rowcount
            )
        log.warning(
            "agent forgotten",
            extra={"agent": agent, "devices": len(listed), "site_removed": site_removed, "by": by},
        )
        return ForgottenAgent(
            row.site,
            agent,
            [ForgottenDevice(d.id, d.site, agent, d.device_key) for d in listed],
            resolved,
            site_removed,
        )
