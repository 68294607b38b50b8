"""A background task of the agent that crashes stops the agent with an error, and the watchdog pings end.

Before, the crash was logged and the agent ran on without it (no heartbeats, or no publishing)
while the systemd watchdog kept being pinged, so nothing restarted it. The faults are injected
in real daemons: through the notifier it is given (a systemd notify socket that is real), by
corrupting a setting the sender's pump reads, and, for the command line, by a ``sitecustomize``
in the agent's own process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from micboard.agent.daemon import AgentDaemon, TaskCrashedError
from micboard.agent.sender import EventSender
from micboard.agent.settings import AgentSettings
from micboard.shared.natsd import EmbeddedNats, free_port
from micboard.shared.sdnotify import SystemdNotifier

BIN = Path(sys.executable).parent


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


class BreakingNotifier(SystemdNotifier):
    """A real notifier whose status updates start failing on demand (a fault in the heartbeat's path).

    It also counts watchdog pings made once the daemon knows an essential task died: there must be none.
    """

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ)
        self.broken = False
        self.daemon: AgentDaemon | None = None
        self.pings = 0
        self.pings_after_failure = 0

    def status(self, text: str) -> bool:
        if self.broken:
            raise RuntimeError("injected: status update failed")
        return super().status(text)

    def watchdog(self) -> bool:
        self.pings += 1
        if self.daemon is not None and self.daemon.failure is not None:
            self.pings_after_failure += 1
        return super().watchdog()


def _settings(tmp_path: Path, nats_url: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "site": f"crash-{secrets.token_hex(3)}",
        "agent": "pi-1",
        "nats_url": nats_url,
        "state_dir": tmp_path / "state",
        "discovery_mdns": False,
        "discovery_slp": False,
        "heartbeat_interval_s": 0.2,
        **overrides,
    }
    return AgentSettings(**values)


async def test_a_crashed_heartbeat_stops_the_agent_and_the_watchdog_pings(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    # A watchdog of 0.2 s: pinged every 0.1 s.
    notifier = BreakingNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    daemon = AgentDaemon(_settings(tmp_path, f"nats://127.0.0.1:{free_port()}"), notifier=notifier)
    notifier.daemon = daemon
    run = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            while notifier.pings < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert "WATCHDOG=1" in _received(sock)
        notifier.broken = True
        async with asyncio.timeout(5):  # before: run() went on, heartbeat dead, watchdog pinged
            with pytest.raises(TaskCrashedError) as info:
                await run
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    assert info.value.task == "heartbeat"
    assert "RuntimeError: injected: status update failed" in str(info.value)
    assert daemon.failure is info.value
    assert notifier.pings_after_failure == 0
    assert "STOPPING=1" in "\n".join(_received(sock))


async def test_a_crashed_sender_loop_stops_the_agent(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    daemon = AgentDaemon(_settings(tmp_path, nats_server.url))
    sender = daemon.sender
    assert isinstance(sender, EventSender)
    run = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            await daemon.wait_subscribed()
        # Corrupt what the sender's pump reads for each round of publishes: it dies with a TypeError.
        sender.max_in_flight = None  # type: ignore[assignment]
        async with asyncio.timeout(5):
            with pytest.raises(TaskCrashedError) as info:
                await run
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    assert info.value.task == "sender:micboard-sender-pump"
    assert isinstance(info.value.error, TypeError)


SITECUSTOMIZE = """
import os
from micboard.agent import daemon as _daemon

_real = _daemon.AgentDaemon.heartbeat
_calls = 0

def _failing(self):
    global _calls
    _calls += 1
    if _calls > int(os.environ["HEARTBEATS_BEFORE_FAULT"]):
        raise RuntimeError("injected heartbeat fault")
    return _real(self)

_daemon.AgentDaemon.heartbeat = _failing
"""


async def test_the_command_line_exits_non_zero_so_that_systemd_restarts_it(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": str(hooks),
        "HEARTBEATS_BEFORE_FAULT": "3",
        "MICBOARD_NATS_URL": nats_server.url,
        "MICBOARD_STATE_DIR": str(tmp_path / "state"),
        "MICBOARD_DISCOVERY_MDNS": "false",
        "MICBOARD_DISCOVERY_SLP": "false",
        "MICBOARD_HEARTBEAT_INTERVAL_S": "0.2",
        "MICBOARD_SITE": "crash-cli",
    }
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        BIN / "micboard-agent", "run", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):  # before: it ran on until killed
            _out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = err.decode()
    assert process.returncode == 1, log[-3000:]
    assert time.monotonic() - started < 30
    assert (
        'msg="essential agent task crashed, stopping the agent (systemd restarts it)" task=heartbeat' in log
    )
    assert "RuntimeError: injected heartbeat fault" in log
    assert "agent stopped" in log and "failed=heartbeat" in log
    assert log.rstrip().splitlines()[-1] == (
        "micboard-agent run: stopped: essential task heartbeat crashed: "
        "RuntimeError: injected heartbeat fault"
    )
