"""Alembic migrations on empty SQLite and PostgreSQL, the start-up policy and ``micboard-collector check``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection

from micboard.collector.cli import main
from micboard.collector.errors import SchemaNotCurrentError
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store import migrate
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema import channels, metadata
from micboard.shared.envelope import DeviceBody, DeviceEvent, HelloBody, HelloEvent
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor


def _diff(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_from_empty_reaches_head_and_matches_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        before = await migrate.state(engine)
        assert (before.current, before.empty, before.at_head) == (None, True, False)
        assert await migrate.check(engine) is False
        await migrate.upgrade(engine)
        assert await migrate.current(engine) == migrate.head_revision()
        assert await migrate.check(engine) is True
        async with engine.connect() as conn:
            # The migrations create exactly what the models describe, on this database.
            assert await conn.run_sync(_diff) == []
        await migrate.upgrade(engine)  # idempotent at head
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
    finally:
        await engine.dispose()


async def test_first_revision_keeps_its_id(sqlite_url: str) -> None:
    # Later revisions chain onto "0001"; renaming it would orphan them.
    await migrate.upgrade(sqlite_url, "0001")
    assert await migrate.current(sqlite_url) == "0001"


async def test_prepare_migrates_only_an_empty_sqlite_database(tmp_path: Path, db_url: str) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    try:
        state = await migrate.prepare(engine, "empty-sqlite")
        assert state.at_head
    finally:
        await engine.dispose()
    other = create_engine(db_url)
    try:
        await migrate.upgrade(other, "0001")
        with pytest.raises(SchemaNotCurrentError, match="micboard-collector migrate"):
            await migrate.prepare(other, "empty-sqlite")
        with pytest.raises(SchemaNotCurrentError):
            await migrate.prepare(other, "never")
        assert (await migrate.prepare(other, "always")).at_head
    finally:
        await other.dispose()


async def test_an_empty_postgres_database_is_not_migrated_behind_the_operators_back(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with pytest.raises(SchemaNotCurrentError, match="revision none"):
            await migrate.prepare(engine, "empty-sqlite")
    finally:
        await engine.dispose()


def test_check_and_migrate_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MICBOARD_NATS_URL", raising=False)
    monkeypatch.delenv("MICBOARD_DATABASE_URL", raising=False)
    # A new SQLite file is ready: `run` creates the schema itself.
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "ok   schema: at revision none (empty)" in out and "`run` will migrate it automatically" in out
    monkeypatch.setenv("MICBOARD_AUTO_MIGRATE", "never")
    assert main(["check"]) == 4
    assert "FAIL schema: at revision none (empty)" in capsys.readouterr().out
    monkeypatch.delenv("MICBOARD_AUTO_MIGRATE")
    assert main(["migrate"]) == 0
    assert f"database migrated: empty -> {migrate.head_revision()}" in capsys.readouterr().out
    assert main(["check"]) == 0
    assert "ok   schema: at head revision" in capsys.readouterr().out
    monkeypatch.setenv("MICBOARD_NATS_URL", "nats://127.0.0.1:9")
    assert main(["check"]) == 5
    assert "FAIL nats: nats://127.0.0.1:9 unreachable" in capsys.readouterr().out
    monkeypatch.setenv("MICBOARD_DATABASE_URL", "postgresql+asyncpg://nobody@127.0.0.1:9/none")
    assert main(["check"]) == 3
    assert "FAIL database" in capsys.readouterr().out
    monkeypatch.setenv("MICBOARD_MAX_DELIVER", "0")
    assert main(["check"]) == 2
    assert "max_deliver" in capsys.readouterr().err


async def test_channel_details_are_back_filled_from_device_state(db_url: str) -> None:
    # Revision 0005 copies group/channel and battery type out of each device's stored state.
    # Write devices at head through the real sync path, go back to 0004 (the columns go), come
    # forward again and read what the back-fill put in the rows.
    channels_ = (
        ReceiverChannel(
            index=1,
            name="HH01 Ann",
            group_channel="1,23",
            transmitter=Transmitter(model="ULXD2", battery_bars=4, battery_type="LION"),
        ),
        ReceiverChannel(index=2, name="HH02 Bo", group_channel=None, transmitter=None),
        ReceiverChannel(
            index=3, name="HH03 Cy", group_channel="2,1", transmitter=Transmitter(battery_type=None)
        ),
    )
    device = Device(device_key="rx1", vendor=Vendor.SHURE, family=Family.ULXD, channels=channels_)
    events: list[Any] = [
        HelloEvent(site="s1", agent="a1", boot="b1", seq=1, ts=1, body=HelloBody(version="1", hostname="h")),
        DeviceEvent(
            site="s1", agent="a1", boot="b1", seq=2, ts=2, body=DeviceBody(device_key="rx1", snapshot=device)
        ),
    ]
    engine = create_engine(db_url)
    try:
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await SynchronizationService().apply_batch(conn, events)
        await migrate.downgrade(engine, "0004")
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(channels.c.index, channels.c.group_channel, channels.c.battery_type).order_by(
                        channels.c.index
                    )
                )
            ).all()
        assert [tuple(r) for r in rows] == [(1, "1,23", "LION"), (2, None, None), (3, "2,1", None)]
    finally:
        await engine.dispose()
