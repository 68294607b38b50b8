"""DeviceService: read devices for the API (and, later, send commands to their agents)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import CommandUnavailableError
from micboard.collector.services.commands import CommandReceipt, CommandService
from micboard.collector.store.schema import devices


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """Filters of a device listing; ``None`` means no filter."""

    site: str | None = None
    status: str | None = None
    vendor: str | None = None


class DeviceService:
    """Reads devices from the store."""

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
