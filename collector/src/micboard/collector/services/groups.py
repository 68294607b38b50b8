"""GroupStore: the channel groups users arrange on the dashboard, kept across restarts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.store.schema_api import groups


@dataclass(frozen=True, slots=True)
class Group:
    """A named, ordered set of channels, optionally tied to a site."""

    id: int
    name: str
    site: str | None
    channels: list[dict[str, int]]
    position: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "name": self.name,
            "site": self.site,
            "channels": self.channels,
            "position": self.position,
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _group(row: Any) -> Group:
    channels = [
        {"device_id": int(c["device_id"]), "index": int(c["index"])}
        for c in (row["channels"] or [])
        if isinstance(c, dict)
    ]
    return Group(row["id"], row["name"], row["site"], channels, row["position"])


class GroupStore:
    """Lists, creates, replaces and deletes groups."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def list_groups(
        self, *, limit: int, offset: int, site: str | None = None
    ) -> tuple[list[Group], int]:
        """Groups by position, and how many there are, in one query."""
        query = select(groups, func.count().over().label("_total")).order_by(groups.c.position, groups.c.id)
        if site is not None:
            query = query.where(groups.c.site == site)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit).offset(offset))).mappings().all()
            if rows:
                return [_group(r) for r in rows], int(rows[0]["_total"])
            if offset == 0:
                return [], 0
            count = select(func.count()).select_from(groups)
            if site is not None:
                count = count.where(groups.c.site == site)
            return [], int((await conn.execute(count)).scalar_one())

    async def get(self, group_id: int) -> Group | None:
        """One group, or ``None``."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(groups).where(groups.c.id == group_id))).mappings().first()
        return None if row is None else _group(row)

    async def create(
        self, name: str, site: str | None, channels: list[dict[str, int]], position: int
    ) -> Group:
        """Store a new group."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(groups).values(
                    name=name, site=site, channels=channels, position=position, updated_ms=_now_ms()
                )
            )
            group_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        assert isinstance(group_id, int)
        return Group(group_id, name, site, channels, position)

    async def replace(
        self, group_id: int, name: str, site: str | None, channels: list[dict[str, int]], position: int
    ) -> Group | None:
        """Replace a group's content; ``None`` if it does not exist."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(groups)
                .where(groups.c.id == group_id)
                .values(name=name, site=site, channels=channels, position=position, updated_ms=_now_ms())
            )
        if not result.rowcount:
            return None
        return Group(group_id, name, site, channels, position)

    async def delete(self, group_id: int) -> bool:
        """Delete a group; returns whether it existed."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(groups).where(groups.c.id == group_id))
        return bool(result.rowcount)
