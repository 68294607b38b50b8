"""A round trip to NATS that misses its deadline must not cost the connection its read loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import FlushTimeoutError

from micboard.agent.publisher import round_trip
from micboard.shared.natsd import EmbeddedNats


async def _subscribed(nc: Client, subject: str) -> asyncio.Queue[Msg]:
    """Subscribe ``nc`` to ``subject``, known to the server when this returns."""
    got: asyncio.Queue[Msg] = asyncio.Queue()
    await nc.subscribe(subject, cb=got.put)
    # A flush's PING can overtake a SUB still queued for the flusher: the second proves the SUB.
    for _ in range(2):
        await nc.flush(timeout=2)
    return got


def _all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
    return bool(states) and all(state in "Tt" for state in states)


async def _stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped: SIGSTOP takes effect a moment after ``kill``
    returns, and a server thread still running could answer a PING meanwhile."""
    for _ in range(500):
        if _all_stopped(pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


async def _arrives(got: asyncio.Queue[Msg]) -> bool:
    try:
        await asyncio.wait_for(got.get(), 2.0)
    except TimeoutError:
        return False
    return True


async def test_a_late_pong_leaves_the_connection_receiving(nats_private: EmbeddedNats) -> None:
    """The server stalls past the deadline; when its PONGs arrive late, our link still works.

    The plain ``Client.flush`` beside it shows what happens otherwise: its cancelled future makes
    the client's read loop fail on the late PONG, and that connection receives nothing more.
    """
    ours = await nats.connect(nats_private.url, max_reconnect_attempts=0)
    plain = await nats.connect(nats_private.url, max_reconnect_attempts=0)
    other = await nats.connect(nats_private.url, max_reconnect_attempts=0)
    pid = nats_private.pid
    assert pid is not None
    try:
        to_ours = await _subscribed(ours, "late.pong.ours")
        to_plain = await _subscribed(plain, "late.pong.plain")
        os.kill(pid, signal.SIGSTOP)
        try:
            await _stopped(pid)
            with pytest.raises(FlushTimeoutError):
                await round_trip(ours, 0.3)
            with pytest.raises(FlushTimeoutError):
                await plain.flush(timeout=0.3)  # type: ignore[arg-type]  # nats-py types it int
        finally:
            os.kill(pid, signal.SIGCONT)
        await round_trip(ours, 2.0)  # the late PONG arrived first, then this one: in order
        await other.publish("late.pong.ours", b"1")
        await other.publish("late.pong.plain", b"1")
        await other.flush(timeout=2)
        assert await _arrives(to_ours)
        assert not await _arrives(to_plain), (
            "nats-py no longer loses its read loop on a late PONG: round_trip's workaround may go"
        )
    finally:
        for nc in (ours, plain, other):
            await nc.close()
