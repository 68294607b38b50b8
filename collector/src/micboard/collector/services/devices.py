"""DeviceService: read devices for the API (and, later, send commands to their agents)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.store.schema import devices


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """Filters of a device listing; ``None`` means no filter."""

    site: str | None = None
    status: str | None = None
    vendor: str | None = None


class DeviceService:
    """Reads devices from the store."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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
