"""AgentDaemon command edges on a real nats-server: wrong kinds, silent devices, replies nobody asked for."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats

from micboard.agent.daemon import AgentDaemon
from micboard.agent.discovery import FoundDevice
from micboard.agent.settings import AgentSettings
from micboard.shared.codec import decode_command_result, encode
from micboard.shared.envelope import (
    CommandAction,
    CommandBody,
    CommandEvent,
    CommandOutcome,
    HelloBody,
    HelloEvent,
)
from micboard.shared.model import Family, Vendor
from micboard.shared.natsd import EmbeddedNats, free_port

SITE, AGENT = "hall", "pi-edges"


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def agent_settings(server: EmbeddedNats, tmp_path: Path, **overrides: Any) -> AgentSettings:
    """An agent on ``server`` with discovery off and a short connect timeout."""
    values: dict[str, Any] = {
        "site": SITE,
        "agent": AGENT,
        "nats_url": server.url,
        "state_dir": tmp_path / "state",
        "discovery_mdns": False,
        "discovery_slp": False,
        "connect_timeout_s": 0.3,
    }
    return AgentSettings(**{**values, **overrides})


def command(action: CommandAction, **body: object) -> bytes:
    return encode(
        CommandEvent(
            site=SITE,
            agent=AGENT,
            boot="collector",
            seq=0,
            ts=int(time.time() * 1000),
            body=CommandBody(request_id=secrets.token_hex(4), action=action, **body),
        )
    )


async def test_commands_the_daemon_cannot_carry_out(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    settings = agent_settings(
        nats_server,
        tmp_path,
        reconnect_backoff_initial_s=0.2,
        reconnect_backoff_max_s=0.5,
        shutdown_timeout_s=3.0,
    )
    daemon = AgentDaemon(settings)
    await daemon.start()
    await daemon.start()  # started already
    nc = await nats.connect(nats_server.url)
    try:
        await asyncio.wait_for(daemon.wait_subscribed(), 10)
        # Not a command at all.
        hello = HelloEvent(site=SITE, agent=AGENT, boot="b", seq=1, ts=1, body=HelloBody(version="1"))
        result = await daemon.handle_command(encode(hello))
        assert result.outcome is CommandOutcome.INVALID and result.detail == "expected a cmd, got hello"
        # A device that is supervised but does not answer (nothing listens on its port).
        found = FoundDevice(
            source="static", address="127.0.0.1", port=free_port(), vendor=Vendor.SHURE, family=Family.ULXD
        )
        key = await daemon.supervisor.adopt(found)
        assert key is not None
        reply = await nc.request(
            daemon.cmd_subject, command(CommandAction.IDENTIFY, device_key=key), timeout=5
        )
        offline = decode_command_result(reply.data)
        assert (
            offline.outcome is CommandOutcome.DEVICE_OFFLINE and offline.detail == "device is not answering"
        )
        # A command published without a reply subject is still carried out and counted.
        await nc.publish(daemon.cmd_subject, command(CommandAction.REDISCOVER))
        await eventually(lambda: daemon.stats.commands.get("ok", 0) == 1)
        text = {m.name: m for m in daemon.collect_metrics()}["micboard_agent_commands_total"]
        assert sorted((dict(labels)["outcome"], v) for labels, v in text.samples) == [
            ("device_offline", 1),
            ("ok", 1),
        ]
    finally:
        await nc.close()
        await daemon.close()
    await daemon.close()  # closed already


async def test_subscribed_means_the_server_has_the_command_subscription(
    nats_private: EmbeddedNats, tmp_path: Path
) -> None:
    """``wait_subscribed()`` returns once the server routes commands to the agent, not before.

    nats-py writes a flush's PING ahead of a SUB still queued for its flusher task, so one flush
    after subscribing could return before the server had the subscription (a command sent then
    found no responder, about one run in twenty on a busy machine).
    """
    daemon = AgentDaemon(agent_settings(nats_private, tmp_path))
    await daemon.start()
    try:
        await asyncio.wait_for(daemon.wait_subscribed(), 10)
        # Asked of the server itself, at once and once: no retry to hide a late SUB.
        url = f"http://{nats_private.host}:{nats_private.monitor_port}/subsz?subs=1&test={daemon.cmd_subject}"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            subs = await response.json()
        assert [s["subject"] for s in subs["subscriptions_list"]] == [daemon.cmd_subject]
    finally:
        await daemon.close()
