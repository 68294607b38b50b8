"""AlertService on SQLite and PostgreSQL: a batch's plain alert updates cost a few statements, same rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.services.alerts import AlertChange, AlertService, DeviceTransition
from micboard.collector.store.schema import agents, sites
from micboard.collector.store.schema_alerts import alerts
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor

T0 = 1_700_000_000_000
SITE, AGENT = "venue", "pi-1"
HOLD_STARTED = T0 + 500
T1 = T0 + 31_000  # past the 30 s hold that started at HOLD_STARTED


def device(key: str, *percents: int | None) -> Device:
    """A receiver with one channel per entry of ``percents`` (a transmitter reporting that percent)."""
    return Device(
        device_key=key,
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=tuple(
            ReceiverChannel(index=i, transmitter=Transmitter(battery_percent=p))
            for i, p in enumerate(percents, start=1)
        ),
    )


async def evaluate(
    service: AlertService, engine: AsyncEngine, moves: Sequence[tuple[str, Device | None, Device]], at_ms: int
) -> list[AlertChange]:
    changes = [
        DeviceTransition(SITE, AGENT, key, before, after, "online" if before else None, "online")
        for key, before, after in moves
    ]
    async with engine.begin() as conn:
        return await service.evaluate_devices(conn, changes, now_ms=at_ms)


@contextmanager
def alert_updates(engine: AsyncEngine) -> Iterator[list[str]]:
    """The UPDATE statements on ``alerts`` run meanwhile (an executemany counts once)."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        statement = args[2]
        if statement.lstrip().upper().startswith("UPDATE ALERTS"):
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def stored(engine: AsyncEngine) -> dict[tuple[str, str], dict[str, Any]]:
    """Every alert by (target, rule); resolved ones too, and only one per key is expected here."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(alerts))).mappings().all()
    found = {(row["target"], row["rule"]): dict(row) for row in rows}
    assert len(found) == len(rows)
    return found


def ours(target: str, key: str) -> int:
    """The channel of ``target`` if it is a channel of device ``key``, else 0."""
    prefix = f"{AGENT}/{key}/"
    return int(target.removeprefix(prefix)) if target.startswith(prefix) else 0


def plan(d: int) -> tuple[tuple[int | None, ...], tuple[int | None, ...], tuple[int | None, ...]]:
    """Device ``d``'s readings: at T0, at HOLD_STARTED, in the batch at T1 (values differ per device).

    Channel 1 stays low and critical at a new value; channel 2 stays low and clears critical (the
    hold starts); channel 3 turns unknown; channel 4 goes from low to critical (critical opens);
    channel 5 started its hold on low before and resolves now.
    """
    at_t0 = (1 + d % 9, 5 + d % 5, 20 + d % 5, 20 + d % 5, 22)
    at_hold = (*at_t0[:4], 40)
    at_t1 = (2 + d % 9, 16 + d % 5, None, 1 + d % 5, 50)
    return at_t0, at_hold, at_t1


async def test_a_batch_writes_plain_updates_as_one_statement_per_shape(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    n = 40
    keys = [f"rx-{d}" for d in range(n)]
    await evaluate(service, engine, [(k, None, device(k, *plan(d)[0])) for d, k in enumerate(keys)], T0)
    moves = [(k, device(k, *plan(d)[0]), device(k, *plan(d)[1])) for d, k in enumerate(keys)]
    await evaluate(service, engine, moves, HOLD_STARTED)
    before = await stored(engine)
    assert len(before) == 7 * n

    moves = [(k, device(k, *plan(d)[1]), device(k, *plan(d)[2])) for d, k in enumerate(keys)]
    with alert_updates(engine) as updates:
        changes = await evaluate(service, engine, moves, T1)

    assert sorted((c.kind.value, c.alert.rule.value) for c in changes) == sorted(
        [("opened", "battery_critical"), ("resolved", "battery_low")] * n
    )
    resolutions = [s for s in updates if "resolved_by" in s]
    plain = [s for s in updates if "resolved_by" not in s]
    # One per resolved alert (they stay single statements), and the 5 * n plain updates in three
    # statements: new value, hold started, turned unknown.
    assert len(resolutions) == n
    assert len(plain) == 3, plain

    after = await stored(engine)
    new_value = {"clear_since_ms": None, "observed_ms": T1, "updated_ms": T1, "state": "open"}
    resolved = {"state": "resolved", "resolved_by": "system", "resolved_ms": T1, "updated_ms": T1}
    for d, key in enumerate(keys):
        at_t1 = plan(d)[2]
        was = {(c, r.removeprefix("battery_")): row for (t, r), row in before.items() if (c := ours(t, key))}
        now = {(c, r.removeprefix("battery_")): row for (t, r), row in after.items() if (c := ours(t, key))}
        # Each row got its own value, not a neighbour's from the same statement.
        for channel, rule in ((1, "low"), (1, "critical"), (2, "low"), (4, "low")):
            assert now[channel, rule] == was[channel, rule] | new_value | {"value": at_t1[channel - 1]}
        assert now[2, "critical"] == was[2, "critical"] | {"clear_since_ms": T1, "updated_ms": T1}
        # Turned unknown: only when it was last seen moves ("previously low" ages from here).
        assert now[3, "low"] == was[3, "low"] | {"observed_ms": T1}
        assert now[4, "critical"]["opened_ms"] == T1 and now[4, "critical"]["value"] == at_t1[3]
        assert was[5, "low"]["clear_since_ms"] == HOLD_STARTED
        assert now[5, "low"] == was[5, "low"] | resolved
        assert len(now) == 8


async def test_two_transitions_of_one_device_in_a_batch_apply_in_order(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    key = "rx-1"
    await evaluate(service, engine, [(key, None, device(key, 5, 20, 22))], T0)
    await evaluate(service, engine, [(key, device(key, 5, 20, 22), device(key, 5, 20, 40))], HOLD_STARTED)
    before = await stored(engine)

    # Both transitions are evaluated against the alerts in force before the batch. Channel 1 takes
    # two new values: the later wins. Channel 2's low starts its hold, then is breached again: the
    # later write, which ends the hold, wins. Channel 3's low (held since HOLD_STARTED) is breached
    # again, then clears for good and resolves.
    first, second, third = device(key, 5, 20, 40), device(key, 6, 35, 20), device(key, 7, 21, 50)
    with alert_updates(engine) as updates:
        changes = await evaluate(service, engine, [(key, first, second), (key, second, third)], T1)
    assert [(c.kind.value, c.alert.rule.value) for c in changes] == [("resolved", "battery_low")]
    # The updates held until channel 3 resolves are written before its resolution (one statement,
    # all of one shape), so it sees them in order; nothing is left for the end.
    assert len(updates) == 2 and "resolved_by" in updates[1], updates

    after = await stored(engine)

    def pair(channel: int, rule: str) -> tuple[dict[str, Any], dict[str, Any]]:
        target = f"{AGENT}/{key}/{channel}"
        return before[target, f"battery_{rule}"], after[target, f"battery_{rule}"]

    new_value = {"clear_since_ms": None, "observed_ms": T1, "updated_ms": T1}
    was, now = pair(1, "critical")
    assert now == was | new_value | {"value": 7.0}
    was, now = pair(1, "low")
    assert now == was | new_value | {"value": 7.0}
    was, now = pair(2, "low")
    assert now == was | new_value | {"value": 21.0}
    was, now = pair(3, "low")
    assert was["clear_since_ms"] == HOLD_STARTED
    resolved = {"state": "resolved", "resolved_by": "system", "resolved_ms": T1}
    assert now == was | new_value | {"value": 20.0} | resolved


async def test_a_sweep_refreshes_the_ages_of_silent_agents_in_one_statement(engine: AsyncEngine) -> None:
    service = AlertService(engine)
    n = 30
    async with engine.begin() as conn:
        await conn.execute(insert(sites).values(site=SITE, first_seen_ms=T0, last_seen_ms=T0))
        await conn.execute(
            insert(agents),
            [
                {
                    "agent": f"pi-{i}",
                    "site": SITE,
                    "boot": "b1",
                    "last_heartbeat_ms": T0 + i,
                    "last_seen_ms": T0,
                }
                for i in range(n)
            ],
        )
    opened = await service.sweep(now_ms=T0 + 40_000)
    assert [c.alert.rule.value for c in opened] == ["agent_stale"] * n
    # A minute later every stale alert's age is due: written together, each with its own age.
    later = T0 + 100_000
    with alert_updates(engine) as updates:
        assert await service.sweep(now_ms=later) == []
    assert len(updates) == 1, updates
    after = await stored(engine)
    for i in range(n):
        row = after[f"pi-{i}", "agent_stale"]
        assert row["value"] == round((later - T0 - i) / 1000, 1)
        assert row["observed_ms"] == row["updated_ms"] == later and row["state"] == "open"
