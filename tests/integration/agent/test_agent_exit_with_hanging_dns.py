"""SIGTERM ends ``micboard-agent run`` within 5 s even while a name look-up of the NATS host hangs.

The resolver that never answers (a WAN that is down) is made in the agent's own process: a
``sitecustomize`` on its ``PYTHONPATH`` makes ``socket.getaddrinfo`` of one reserved name
(``.test`` never resolves) sleep 30 s, as a resolver timing out does, and mark when it began.
Everything else is real: the agent, its outbox, nats-py's connect through the loop's executor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SLOW_HOST = "nats.hanging-resolver.test"

SITECUSTOMIZE = f"""
import os, socket, time
_real = socket.getaddrinfo
def _hanging(host, *args, **kwargs):
    if host == {SLOW_HOST!r}:
        with open(os.environ["LOOKUP_MARK"], "a") as mark:
            mark.write("lookup\\n")
        time.sleep(30)  # a resolver that never answers, until its timeout
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _hanging
"""


def _environment(tmp_path: Path) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": str(hooks),
        "LOOKUP_MARK": str(tmp_path / "lookups"),
        "MICBOARD_NATS_URL": f"nats://{SLOW_HOST}:4222",
        "MICBOARD_STATE_DIR": str(tmp_path / "state"),
        "MICBOARD_DISCOVERY_MDNS": "false",
        "MICBOARD_DISCOVERY_SLP": "false",
        "MICBOARD_SITE": "dns",
        "MICBOARD_AGENT": "hang-agent",
    }


def _says(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


async def _wait_for(path: Path, text: str, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not _says(path, text):  # noqa: ASYNC110 - another process writes it
            await asyncio.sleep(0.05)


async def test_sigterm_exits_within_five_seconds_while_the_nats_lookup_hangs(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            BIN / "micboard-agent", "run", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file
        )
    try:
        await _wait_for(log_path, "agent started", 20)
        await _wait_for(tmp_path / "lookups", "lookup", 10)  # nats-py's look-up hangs now
        await asyncio.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5.0):
            code = await process.wait()
        took = time.monotonic() - started
        log = log_path.read_text()
        assert took < 5.0, log[-2000:]
        assert code == 0, log[-2000:]
        assert "agent stopped" in log and "sender closed" in log
        # What was made before the stop waits in the outbox for the next start.
        assert "outbox_depth=0 " not in log.split("sender closed", 1)[1].splitlines()[0]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_check_ends_within_its_timeout_while_the_nats_lookup_hangs(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        BIN / "micboard-agent", "check", "--timeout", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(15):
            out, _err = await process.communicate()
        took = time.monotonic() - started
        assert process.returncode == 1
        assert f"FAIL nats: nats://{SLOW_HOST}:4222 not reachable" in out.decode()
        # 2 s for NATS, the rest is the interpreter's start: not the 30 s the resolver holds.
        assert took < 10, took
        assert (tmp_path / "lookups").read_text().count("lookup") >= 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
