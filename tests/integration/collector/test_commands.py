"""CommandService over a real nats-server: request/reply to a responder, typed outcomes, the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import (
    ChannelNotFoundError,
    CollectorErrorCode,
    DeviceNotFoundError,
    InvalidCommandError,
)
from micboard.collector.services.commands import (
    ABANDONED_AFTER_MS,
    COLLECTOR_BOOT,
    CommandService,
    CommandStatus,
)
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store.schema import devices
from micboard.collector.store.schema_alerts import command_log
from micboard.shared.codec import decode, encode
from micboard.shared.envelope import (
    CommandAction,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    DeviceBody,
    DeviceEvent,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor
from micboard.shared.natsd import EmbeddedNats

SUBJECT = "micboard.v1.venue.pi-1.cmd"


@pytest.fixture
async def stored_device(engine: AsyncEngine) -> Device:
    dev = Device(
        device_key="dev-1",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        channels=(
            ReceiverChannel(index=1, name="HH01 Fatai", transmitter=Transmitter(battery_bars=4)),
            ReceiverChannel(index=2, name="HH02"),
        ),
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
    return dev


class Responder:
    """A tiny agent stand-in: decodes the real envelope and answers with a real CommandResult."""

    def __init__(self, outcome: CommandOutcome, detail: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        self.requests: list[CommandEvent] = []

    async def handle(self, msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, CommandEvent)
        self.requests.append(event)
        result = CommandResult(request_id=event.body.request_id, outcome=self.outcome, detail=self.detail)
        await msg.respond(encode(result))


async def test_rename_ok_round_trip(
    engine: AsyncEngine, nc: Client, stored_device: Device, nats_private: EmbeddedNats
) -> None:
    responder = Responder(CommandOutcome.OK)
    agent_side = await nats.connect(servers=[nats_private.url], name="test-agent")
    await agent_side.subscribe(SUBJECT, cb=responder.handle)
    await agent_side.flush()
    service = CommandService(engine, nc, timeout_s=2)
    async with engine.connect() as conn:
        before = (await conn.execute(select(devices.c.state, devices.c.updated_ms))).one()
    receipt = await service.rename("pi-1", "dev-1", 1, "HH01 Ngozi", requested_by="ada")
    await agent_side.close()
    assert receipt.status is CommandStatus.OK and receipt.status.succeeded
    assert receipt.site == "venue" and receipt.completed_ms >= receipt.requested_ms
    [event] = responder.requests
    assert (event.site, event.agent, event.boot, event.seq) == ("venue", "pi-1", COLLECTOR_BOOT, 0)
    assert event.body.action is CommandAction.RENAME
    assert (event.body.device_key, event.body.channel, event.body.value) == ("dev-1", 1, "HH01 Ngozi")
    assert event.body.request_id == receipt.request_id
    async with engine.connect() as conn:
        after = (await conn.execute(select(devices.c.state, devices.c.updated_ms))).one()
        logged = (await conn.execute(select(command_log))).mappings().one()
    assert after == before  # nothing changes until the device confirms through the event flow
    assert (logged["outcome"], logged["requested_by"], logged["action"]) == ("ok", "ada", "rename")
    [entry] = await service.log_for("pi-1", "dev-1")
    assert entry.request_id == receipt.request_id and entry.status is CommandStatus.OK


async def test_not_supported_and_each_action(engine: AsyncEngine, nc: Client, stored_device: Device) -> None:
    responder = Responder(CommandOutcome.NOT_SUPPORTED, "QLX-D cannot mute")
    sub = await nc.subscribe(SUBJECT, cb=responder.handle)
    service = CommandService(engine, nc, timeout_s=2)
    receipts = [
        await service.mute("pi-1", "dev-1", 1),
        await service.unmute("pi-1", "dev-1", 2),
        await service.identify("pi-1", "dev-1"),
    ]
    await sub.unsubscribe()
    assert [r.status for r in receipts] == [CommandStatus.NOT_SUPPORTED] * 3
    assert receipts[0].detail == "QLX-D cannot mute"
    assert [e.body.action for e in responder.requests] == [
        CommandAction.MUTE,
        CommandAction.UNMUTE,
        CommandAction.IDENTIFY,
    ]
    assert responder.requests[2].body.channel is None


async def test_no_responder_timeout_and_bad_reply(
    engine: AsyncEngine, nc: Client, stored_device: Device
) -> None:
    service = CommandService(engine, nc, timeout_s=0.3)
    receipt = await service.identify("pi-1", "dev-1", 1)
    assert receipt.status is CommandStatus.AGENT_UNREACHABLE and "pi-1" in (receipt.detail or "")

    async def silent(msg: Msg) -> None:
        return None

    sub = await nc.subscribe(SUBJECT, cb=silent)
    assert (await service.identify("pi-1", "dev-1", 1)).status is CommandStatus.TIMEOUT
    await sub.unsubscribe()

    async def garbage(msg: Msg) -> None:
        await msg.respond(b"\xc1 not msgpack")

    sub = await nc.subscribe(SUBJECT, cb=garbage)
    bad = await service.identify("pi-1", "dev-1", 1)
    await sub.unsubscribe()
    assert bad.status is CommandStatus.BAD_REPLY and "wire.garbage" in (bad.detail or "")

    async def wrong_id(msg: Msg) -> None:
        await msg.respond(encode(CommandResult(request_id="someone-else", outcome=CommandOutcome.OK)))

    sub = await nc.subscribe(SUBJECT, cb=wrong_id)
    assert (await service.identify("pi-1", "dev-1", 1)).status is CommandStatus.BAD_REPLY
    await sub.unsubscribe()
    async with engine.connect() as conn:
        outcomes = (
            (await conn.execute(select(command_log.c.outcome).order_by(command_log.c.id))).scalars().all()
        )
    assert outcomes == ["agent_unreachable", "timeout", "bad_reply", "bad_reply"]


async def test_a_request_nats_cannot_carry_is_recorded_not_left_pending(
    engine: AsyncEngine, stored_device: Device, tmp_path: Path
) -> None:
    # A server whose payload limit is below a command's size: nats-py refuses the publish
    # itself (MaxPayloadError), one of the NATS errors besides timeouts and closed links.
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 64\n")
    server = EmbeddedNats(store_dir=tmp_path / "nats", config_file=config)
    await asyncio.to_thread(server.start)
    client = await nats.connect(servers=[server.url])
    try:
        receipt = await CommandService(engine, client, timeout_s=0.5).identify("pi-1", "dev-1", 1)
    finally:
        await client.close()
        await asyncio.to_thread(server.stop)
    assert receipt.status is CommandStatus.AGENT_UNREACHABLE
    assert "MaxPayloadError" in (receipt.detail or "")
    async with engine.connect() as conn:
        outcome = (await conn.execute(select(command_log.c.outcome))).scalar_one()
    assert outcome == "agent_unreachable"


async def test_commands_left_pending_by_a_stopped_collector_are_settled(
    engine: AsyncEngine, nc: Client, stored_device: Device
) -> None:
    service = CommandService(engine, nc, timeout_s=5)
    now = 10_000_000
    async with engine.begin() as conn:
        for request_id, requested_ms in (
            ("old", now - 5_000 - ABANDONED_AFTER_MS - 1),
            ("recent", now - 1_000),
        ):
            await conn.execute(
                insert(command_log).values(
                    request_id=request_id, site="venue", agent="pi-1", device_key="dev-1", channel=1,
                    action="identify", value=None, requested_by="t", outcome="pending",
                    requested_ms=requested_ms,
                )
            )  # fmt: skip
    assert await service.settle_abandoned(now) == 1
    async with engine.connect() as conn:
        rows = dict((await conn.execute(select(command_log.c.request_id, command_log.c.outcome))).all())
    # The recent one may still be answered by its collector: it is left alone.
    assert rows == {"old": "timeout", "recent": "pending"}
    assert await service.settle_abandoned(now) == 0


async def test_invalid_input_is_refused_before_sending(
    engine: AsyncEngine, nc: Client, stored_device: Device
) -> None:
    responder = Responder(CommandOutcome.OK)
    sub = await nc.subscribe(SUBJECT, cb=responder.handle)
    service = CommandService(engine, nc, timeout_s=1)
    for name in ("", "x" * 32, "Zoë", "tab\there"):
        with pytest.raises(InvalidCommandError) as info:
            await service.rename("pi-1", "dev-1", 1, name)
        assert info.value.code == CollectorErrorCode.COMMAND_INVALID
    assert (await service.rename("pi-1", "dev-1", 1, "x" * 31)).status is CommandStatus.OK
    with pytest.raises(ChannelNotFoundError):
        await service.mute("pi-1", "dev-1", 9)
    with pytest.raises(DeviceNotFoundError):
        await service.mute("pi-1", "nope", 1)
    with pytest.raises(DeviceNotFoundError):
        await service.mute("pi-2", "dev-1", 1)
    with pytest.raises(InvalidCommandError):
        await service.send("pi-1", "dev-1", CommandAction.MUTE)
    await sub.unsubscribe()
    assert len(responder.requests) == 1
    async with engine.connect() as conn:
        assert len((await conn.execute(select(command_log))).all()) == 1
