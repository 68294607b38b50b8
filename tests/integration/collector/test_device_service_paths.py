"""DeviceService's command methods: refused without a NATS connection, delegated to the agent with one."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import CollectorErrorCode, CommandUnavailableError
from micboard.collector.services.commands import CommandService, CommandStatus
from micboard.collector.services.devices import DeviceFilter, DeviceService
from micboard.collector.services.sync import SynchronizationService
from micboard.shared.codec import decode, encode
from micboard.shared.envelope import (
    CommandAction,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    DeviceBody,
    DeviceEvent,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Vendor

SUBJECT = "micboard.v1.venue.pi-1.cmd"


async def _store_device(engine: AsyncEngine) -> None:
    dev = Device(
        device_key="dev-1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(ReceiverChannel(index=1, name="HH01"), ReceiverChannel(index=2, name="HH02")),
    )
    event = DeviceEvent(
        site="venue",
        agent="pi-1",
        boot="b1",
        seq=1,
        ts=1000,
        body=DeviceBody(device_key="dev-1", snapshot=dev),
    )
    async with engine.begin() as conn:
        await SynchronizationService().apply(conn, event)


async def test_commands_are_unavailable_without_a_command_service(engine: AsyncEngine) -> None:
    await _store_device(engine)
    service = DeviceService(engine)
    for call in (
        service.rename("pi-1", "dev-1", 1, "HH01 Ada"),
        service.identify("pi-1", "dev-1"),
        service.mute("pi-1", "dev-1", 1),
        service.mute("pi-1", "dev-1", 1, muted=False),
    ):
        with pytest.raises(CommandUnavailableError) as info:
            await call
        assert info.value.code == CollectorErrorCode.COMMAND_UNAVAILABLE
    # Reading still works without commands.
    [row] = await service.list_devices(DeviceFilter(site="venue", vendor="shure"))
    assert (row["agent"], row["device_key"]) == ("pi-1", "dev-1")
    assert await service.list_devices(DeviceFilter(status="offline")) == []


async def test_commands_are_delegated_to_the_owning_agent(engine: AsyncEngine, nc: Client) -> None:
    await _store_device(engine)
    seen: list[tuple[CommandAction, int | None, str | None]] = []

    async def agent(msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, CommandEvent)
        seen.append((event.body.action, event.body.channel, event.body.value))
        await msg.respond(encode(CommandResult(request_id=event.body.request_id, outcome=CommandOutcome.OK)))

    sub = await nc.subscribe(SUBJECT, cb=agent)
    service = DeviceService(engine, CommandService(engine, nc, timeout_s=2))
    receipts = [
        await service.rename("pi-1", "dev-1", 2, "HH02 Bo", by="ada"),
        await service.identify("pi-1", "dev-1", 1, by="ada"),
        await service.mute("pi-1", "dev-1", 1, by="ada"),
        await service.mute("pi-1", "dev-1", 2, muted=False),
    ]
    await sub.unsubscribe()
    assert [r.status for r in receipts] == [CommandStatus.OK] * 4
    assert seen == [
        (CommandAction.RENAME, 2, "HH02 Bo"),
        (CommandAction.IDENTIFY, 1, None),
        (CommandAction.MUTE, 1, None),
        (CommandAction.UNMUTE, 2, None),
    ]
    log = await service._commands().log_for("pi-1", "dev-1")
    assert {entry.request_id for entry in log} == {r.request_id for r in receipts}
