"""CommandService: send rename, identify, mute and unmute to a device's agent and log the outcome.

A command is a core NATS request on ``micboard.v1.<site>.<agent>.cmd`` carrying an encoded
:class:`CommandEvent`; the agent replies with an encoded :class:`CommandResult`. Nothing in the
device tables changes here: the device confirms a change through the normal event flow. Every
command is written to ``command_log`` as ``pending`` before it is sent and completed with its
outcome, so a command in flight when the collector dies is still visible.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import ChannelNotFoundError, DeviceNotFoundError, InvalidCommandError
from micboard.collector.store.schema import devices
from micboard.collector.store.schema_alerts import command_log
from micboard.shared.codec import decode_command_result, encode
from micboard.shared.envelope import CommandAction, CommandBody, CommandEvent
from micboard.shared.errors import WireError
from micboard.shared.model import Device
from micboard.shared.subjects import Kind, build_subject

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 31
"""The longest channel or device name receivers accept."""

COLLECTOR_BOOT = "collector"
#: How long past the request timeout a pending command is taken as abandoned (see settle_abandoned).
ABANDONED_AFTER_MS = 60_000
"""The ``boot`` of envelopes the collector sends (commands are not part of any agent's sequence)."""


class CommandStatus(StrEnum):
    """The outcome of a command as the collector saw it: the agent's outcomes and transport failures."""

    OK = "ok"
    NOT_SUPPORTED = "not_supported"
    DEVICE_OFFLINE = "device_offline"
    INVALID = "invalid"
    FAILED = "failed"
    AGENT_UNREACHABLE = "agent_unreachable"  # no agent is subscribed: nothing was done
    TIMEOUT = "timeout"  # the agent did not answer in time: the command may or may not have run
    BAD_REPLY = "bad_reply"  # the reply could not be decoded or does not match the request

    @property
    def succeeded(self) -> bool:
        """Whether the agent accepted the command."""
        return self is CommandStatus.OK


@dataclass(frozen=True, slots=True)
class CommandReceipt:
    """The typed result of a command: what was asked, and what came of it."""

    request_id: str
    site: str
    agent: str
    device_key: str
    channel: int | None
    action: CommandAction
    value: str | None
    status: CommandStatus
    detail: str | None
    requested_ms: int
    completed_ms: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def validate_name(name: str) -> str:
    """Return ``name`` if receivers accept it: 1 to 31 printable ASCII characters, else raise."""
    if not isinstance(name, str) or not name.strip():
        # Blanks alone would leave the channel without a name on the receiver.
        raise InvalidCommandError("a name must not be empty or blank")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidCommandError(f"a name has at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in name):
        raise InvalidCommandError("a name may hold printable ASCII characters only")
    return name


class CommandService:
    """Sends commands to the owning agent over NATS request/reply and records their outcome."""

    def __init__(self, engine: AsyncEngine, nc: Client, *, timeout_s: float = 5.0) -> None:
        self.engine = engine
        self.nc = nc
        self.timeout_s = timeout_s

    async def rename(
        self, agent: str, device_key: str, channel: int | None, name: str, *, requested_by: str | None = None
    ) -> CommandReceipt:
        """Rename a channel (or the device when ``channel`` is ``None``)."""
        return await self.send(
            agent, device_key, CommandAction.RENAME, channel, validate_name(name), requested_by=requested_by
        )

    async def identify(
        self, agent: str, device_key: str, channel: int | None = None, *, requested_by: str | None = None
    ) -> CommandReceipt:
        """Flash a channel's (or the device's) display so it can be found in the rack."""
        return await self.send(agent, device_key, CommandAction.IDENTIFY, channel, requested_by=requested_by)

    async def mute(
        self, agent: str, device_key: str, channel: int, *, requested_by: str | None = None
    ) -> CommandReceipt:
        """Mute a channel's transmitter."""
        return await self.send(agent, device_key, CommandAction.MUTE, channel, requested_by=requested_by)

    async def unmute(
        self, agent: str, device_key: str, channel: int, *, requested_by: str | None = None
    ) -> CommandReceipt:
        """Unmute a channel's transmitter."""
        return await self.send(agent, device_key, CommandAction.UNMUTE, channel, requested_by=requested_by)

    async def send(
        self,
        agent: str,
        device_key: str,
        action: CommandAction,
        channel: int | None = None,
        value: str | None = None,
        *,
        requested_by: str | None = None,
    ) -> CommandReceipt:
        """Validate, log as pending, send, and log the outcome; raises only for invalid input."""
        action = CommandAction(action)
        if action in (CommandAction.MUTE, CommandAction.UNMUTE) and channel is None:
            raise InvalidCommandError(f"{action.value} needs a channel")
        if action is CommandAction.RENAME and value is None:
            raise InvalidCommandError("rename needs a name")
        if action is CommandAction.RENAME and value is not None:
            validate_name(value)
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(devices.c.site, devices.c.state).where(
                        devices.c.agent == agent, devices.c.device_key == device_key
                    )
                )
            ).first()
        if row is None:
            raise DeviceNotFoundError(agent, device_key)
        site = str(row[0])
        if channel is not None and Device.model_validate(row[1]).channel(channel) is None:
            raise ChannelNotFoundError(agent, device_key, channel)

        request_id = uuid.uuid4().hex
        requested_ms = _now_ms()
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(command_log).values(
                    request_id=request_id,
                    site=site,
                    agent=agent,
                    device_key=device_key,
                    channel=channel,
                    action=action.value,
                    value=value,
                    requested_by=requested_by,
                    outcome="pending",
                    requested_ms=requested_ms,
                )
            )
        status, detail = await self._request(site, agent, request_id, action, device_key, channel, value)
        completed_ms = _now_ms()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(command_log)
                .where(command_log.c.request_id == request_id)
                .values(outcome=status.value, detail=detail, completed_ms=completed_ms)
            )
        log.info(
            "command done",
            extra={
                # The command's own id (the agent's reply carries it), not the HTTP request's,
                # which the API's request line holds as request_id.
                "command_id": request_id,
                "agent": agent,
                "device_key": device_key,
                "action": action.value,
                "outcome": status.value,
            },
        )
        return CommandReceipt(
            request_id,
            site,
            agent,
            device_key,
            channel,
            action,
            value,
            status,
            detail,
            requested_ms,
            completed_ms,
        )

    async def _request(
        self,
        site: str,
        agent: str,
        request_id: str,
        action: CommandAction,
        device_key: str,
        channel: int | None,
        value: str | None,
    ) -> tuple[CommandStatus, str | None]:
        event = CommandEvent(
            site=site,
            agent=agent,
            boot=COLLECTOR_BOOT,
            seq=0,
            ts=_now_ms(),
            body=CommandBody(
                request_id=request_id, action=action, device_key=device_key, channel=channel, value=value
            ),
        )
        subject = build_subject(site, agent, Kind.CMD)
        try:
            reply = await self.nc.request(subject, encode(event), timeout=self.timeout_s)
        except NoRespondersError:
            return CommandStatus.AGENT_UNREACHABLE, f"no agent {agent!r} is listening on {subject}"
        except NatsTimeoutError:
            return CommandStatus.TIMEOUT, f"agent {agent!r} did not answer within {self.timeout_s:g} s"
        except ConnectionClosedError:
            return CommandStatus.AGENT_UNREACHABLE, "the collector is not connected to NATS"
        except NatsError as exc:
            # Draining at shutdown, the outbound buffer full while reconnecting, ...: the request
            # was not sent, and the log must say so rather than stay "pending".
            return CommandStatus.AGENT_UNREACHABLE, f"NATS could not carry the request ({type(exc).__name__})"
        try:
            result = decode_command_result(reply.data)
        except WireError as exc:
            return CommandStatus.BAD_REPLY, str(exc)
        if result.request_id != request_id:
            return CommandStatus.BAD_REPLY, f"reply is for request {result.request_id!r}"
        return CommandStatus(result.outcome.value), result.detail

    async def settle_abandoned(self, now_ms: int | None = None) -> int:
        """Record as timed out the commands still pending long after any answer could have come.

        A collector stopped (or its database write failed) between sending a command and
        recording the answer leaves its row ``pending``; waiting a minute past the request
        timeout leaves every command still in flight elsewhere alone. Returns how many.
        """
        now = _now_ms() if now_ms is None else now_ms
        cutoff = now - int(self.timeout_s * 1000) - ABANDONED_AFTER_MS
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(command_log)
                .where(command_log.c.outcome == "pending", command_log.c.requested_ms < cutoff)
                .values(
                    outcome=CommandStatus.TIMEOUT.value,
                    detail="no answer was recorded: the collector stopped before it came",
                    completed_ms=now,
                )
            )
        return int(result.rowcount or 0)

    async def log_for(self, agent: str, device_key: str, *, limit: int = 50) -> list[CommandReceipt]:
        """The newest completed commands sent to a device, newest first (pending ones are left out)."""
        query = (
            select(command_log)
            .where(command_log.c.agent == agent, command_log.c.device_key == device_key)
            .where(command_log.c.outcome != "pending")
            .order_by(command_log.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            CommandReceipt(
                request_id=row["request_id"],
                site=row["site"],
                agent=row["agent"],
                device_key=row["device_key"],
                channel=row["channel"],
                action=CommandAction(row["action"]),
                value=row["value"],
                status=CommandStatus(row["outcome"]),
                detail=row["detail"],
                requested_ms=row["requested_ms"],
                completed_ms=row["completed_ms"],
            )
            for row in rows
        ]
