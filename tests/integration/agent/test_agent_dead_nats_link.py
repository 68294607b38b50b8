"""A NATS link that dies without a word is noticed within ``ping_interval * (max_outstanding_pings + 1)``.

The real nats-server is frozen with SIGSTOP: its TCP connections stay open and nothing answers,
which is what a NAT that dropped its state or a router that rebooted looks like to the agent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.daemon_rig import create_stream

from micboard.agent.daemon import AgentDaemon
from micboard.agent.sender import EventSender
from micboard.agent.settings import AgentSettings
from micboard.shared.natsd import EmbeddedNats

PING_S = 0.5
MAX_PINGS = 2


@pytest.fixture
def frozen_later(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of this test alone (it gets frozen), thawed and stopped at the end whatever happens."""
    server = EmbeddedNats(store_dir=tmp_path / "nats-store")
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        yield server
    finally:
        os.kill(pid, signal.SIGCONT)
        server.cleanup()


async def test_a_frozen_server_is_declared_lost_within_the_ping_window_and_the_outbox_drains_after(
    frozen_later: EmbeddedNats, tmp_path: Path
) -> None:
    server = frozen_later
    await create_stream(server.url)
    settings = AgentSettings(
        site=f"ping-{secrets.token_hex(3)}",
        agent="ping-agent",
        nats_url=server.url,
        state_dir=tmp_path / "state",
        discovery_mdns=False,
        discovery_slp=False,
        heartbeat_interval_s=0.5,
        publish_timeout_s=1.0,
        nats_ping_interval_s=PING_S,
        nats_max_outstanding_pings=MAX_PINGS,
    )
    daemon = AgentDaemon(settings)
    sender = daemon.sender
    assert isinstance(sender, EventSender)
    pid = server.pid
    assert pid is not None
    try:
        await daemon.start()
        async with asyncio.timeout(10):
            await daemon.wait_subscribed()
        assert sender.stats.connected

        def connected() -> bool:
            return sender.stats.connected

        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        async with asyncio.timeout(10):
            while connected():  # noqa: ASYNC110 - set by nats-py's callbacks
                await asyncio.sleep(0.02)
        noticed_s = time.monotonic() - frozen_at
        # nats-py declares the link stale at the ping after max_outstanding_pings unanswered ones.
        assert noticed_s <= PING_S * (MAX_PINGS + 1) + 1.0, noticed_s
        assert "nats unreachable" in daemon._status_line()

        # Heartbeats made meanwhile wait in the outbox ...
        async with asyncio.timeout(10):
            while sender.stats.outbox_depth == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGCONT)
        # ... and are published once the server answers again.
        async with asyncio.timeout(20):
            while not (sender.stats.connected and sender.stats.outbox_depth == 0):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert sender.stats.reconnects >= 1
    finally:
        os.kill(pid, signal.SIGCONT)  # a failed assertion must not leave the close() a frozen server
        await daemon.close()
