"""Key lookups that stay index searches: ``composite_in`` and ``ints_in`` on each database."""

from __future__ import annotations

import time

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.store.keys import composite_in, ints_in, values_in
from micboard.collector.store.schema import agents, devices, sites


async def _devices(engine: AsyncEngine, count: int) -> list[int]:
    now = int(time.time() * 1000)
    async with engine.begin() as conn:
        await conn.execute(insert(sites).values(site="s1", first_seen_ms=now, last_seen_ms=now))
        await conn.execute(
            insert(agents).values(agent="a1", site="s1", boot="b", status="online", last_seen_ms=now)
        )
        rows = [
            dict(
                site="s1",
                agent="a1",
                device_key=f"rx{i}",
                vendor="shure",
                family="ulxd",
                status="online",
                reported_status="online",
                state={},
                last_boot="b",
                last_seq=i,
                last_ts=i,
                base_seq=0,
                field_seq={},
                updated_ms=now,
            )
            for i in range(count)
        ]
        await conn.execute(insert(devices), rows)
        return [r[0] for r in (await conn.execute(select(devices.c.id).order_by(devices.c.id))).all()]


async def test_ints_in_and_composite_in_find_exactly_the_keys(engine: AsyncEngine) -> None:
    ids = await _devices(engine, 300)
    wanted = ids[::7] + [ids[0], 10**9]  # a repeat and an id that does not exist
    async with engine.connect() as conn:
        dialect = conn.dialect.name
        found = (await conn.execute(select(devices.c.id).where(ints_in(devices.c.id, wanted, dialect)))).all()
        assert sorted(r[0] for r in found) == sorted(set(ids[::7]))
        assert (
            await conn.execute(select(devices.c.id).where(ints_in(devices.c.id, [], dialect)))
        ).all() == []
        by_key = select(devices.c.device_key).where(
            values_in(devices.c.device_key, ["rx7", "rx9", "nope"], dialect)
        )
        assert sorted(r[0] for r in (await conn.execute(by_key)).all()) == ["rx7", "rx9"]
        keys = [("a1", "rx3"), ("a1", "rx250"), ("a2", "rx3")]
        query = select(devices.c.device_key).where(
            composite_in((devices.c.agent, devices.c.device_key), keys)
        )
        assert sorted(r[0] for r in (await conn.execute(query)).all()) == ["rx250", "rx3"]


def test_ints_in_falls_back_to_a_plain_in_list_elsewhere() -> None:
    clause = ints_in(devices.c.id, [3, 1, 3], "mysql")
    assert clause.right.value == [1, 3]
