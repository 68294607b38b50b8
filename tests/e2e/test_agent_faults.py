"""Fault tests of store-and-forward: a 30 s NATS outage, and an agent killed with SIGKILL mid-outage."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from micboard.agent.demo_source import demo_device
from micboard.agent.outbox import OUTBOX_FILE, Outbox
from micboard.agent.publisher import EnvelopeFactory
from micboard.agent.sender import EventSender
from micboard.collector.ingest import ensure_stream
from micboard.collector.settings import CollectorSettings
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceBody, HeartbeatBody, OfflineBody
from micboard.shared.natsd import EmbeddedNats, free_port

pytestmark = pytest.mark.slow
STREAM = "MICBOARD"
OUTAGE_S = 30.0


async def make_stream(url: str, tmp_path: Path) -> None:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        await ensure_stream(nc.jetstream(timeout=5), CollectorSettings(nats_url=url, state_dir=tmp_path))
    finally:
        await nc.close()


async def read_stream(url: str) -> list[tuple[str, AnyEvent]]:
    """The whole stream in stream order, read with an ephemeral pull consumer."""
    nc = await nats.connect(url, connect_timeout=2)
    out: list[tuple[str, AnyEvent]] = []
    try:
        js = nc.jetstream(timeout=5)
        total = (await js.stream_info(STREAM)).state.messages
        sub = await js.pull_subscribe("micboard.v1.>", stream=STREAM)
        while len(out) < total:
            for msg in await sub.fetch(500, timeout=5):
                out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), decode(msg.data)))
                await msg.ack()
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.05)


async def test_a_30_s_outage_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "nats").start()
    sender = EventSender(
        server.url, Outbox.in_state_dir(tmp_path / "agent"), publish_timeout_s=1.0, connect_timeout_s=1.0
    )
    try:
        await make_stream(server.url, tmp_path)
        await sender.start()
        await wait_until(lambda: sender.stats.connected, 10, "connected")
        factory = EnvelopeFactory("venue-f", "pi-f")
        keys = [f"rx-{n}" for n in range(4)]
        made: dict[str, list[int]] = {key: [] for key in keys}
        stop = asyncio.Event()

        async def source() -> None:
            # Several devices changing ~40 times a second overall: deltas, snapshots, offline.
            rng = random.Random(7)
            count = 0
            for key in keys:
                device = demo_device().model_copy(update={"device_key": key})
                event = factory.make(DeviceBody(device_key=key, snapshot=device))
                made[key].append(event.seq)
                await sender.send(event)
            while not stop.is_set():
                count += 1
                key = rng.choice(keys)
                if count % 97 == 0:
                    body: DeviceBody | OfflineBody = OfflineBody(device_key=key)
                elif count % 10 == 0:
                    device = demo_device().model_copy(update={"device_key": key})
                    body = DeviceBody(device_key=key, snapshot=device)
                else:
                    body = DeviceBody(device_key=key, changes={"channels": {2: {"name": f"take {count}"}}})
                event = factory.make(body)
                made[key].append(event.seq)
                await sender.send(event)
                if count % 40 == 0:
                    await sender.send(factory.make(HeartbeatBody(uptime_s=float(count))))
                await asyncio.sleep(0.025)

        producing = asyncio.create_task(source())
        await asyncio.sleep(2.0)
        server.stop()
        await asyncio.sleep(OUTAGE_S)
        during = sender.stats
        assert during.outbox_depth > 500 and not during.connected
        server.start()
        await asyncio.sleep(2.0)
        stop.set()
        await producing
        total = factory.last_seq
        await wait_until(lambda: sender.stats.acked >= total, 30, f"all {total} events acked")
        stats = sender.stats
        assert stats.dropped == 0 and stats.drained == stats.outboxed > 500
        stream = await read_stream(server.url)
        seqs = [event.seq for _mid, event in stream]
        assert sorted(seqs) == list(range(1, total + 1)), "a gap or a duplicate in seq"
        for mid, event in stream:
            assert mid == f"pi-f.{factory.boot}.{event.seq}"
        for key in keys:
            in_stream = [
                e.seq for _mid, e in stream if e.kind in ("device", "offline") and e.body.device_key == key
            ]
            assert in_stream == made[key], f"{key}: stream order differs from production order"
    finally:
        await sender.close(timeout_s=5)
        server.cleanup()


def _outbox_msg_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return [row[0] for row in db.execute("SELECT msg_id FROM events ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        db.close()


def _agent(state_dir: Path, url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": url,
        "MICBOARD_STATE_DIR": str(state_dir),
        "MICBOARD_SITE": "venue-k",
        "MICBOARD_AGENT": "pi-k",
        "MICBOARD_HEARTBEAT_INTERVAL_S": "0.5",
        "MICBOARD_PUBLISH_TIMEOUT_S": "1",
        "MICBOARD_NATS_CONNECT_TIMEOUT_S": "1",
    }
    with (state_dir / "agent.log").open("ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [sys.executable, "-m", "micboard.agent.cli", "run", "--demo-device", "--demo-churn", "50"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_sigkill_then_restart_drains_the_outbox_and_sigterm_is_quick(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    state.mkdir()
    port = free_port()
    server = EmbeddedNats(port=port, store_dir=tmp_path / "nats")
    agent = _agent(state, server.url)  # NATS is down: everything waits in the outbox
    try:
        deadline = time.monotonic() + 20
        while len(_outbox_msg_ids(state / OUTBOX_FILE)) < 100:
            assert agent.poll() is None, (state / "agent.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the agent did not fill its outbox"
            await asyncio.sleep(0.1)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        before_kill = _outbox_msg_ids(state / OUTBOX_FILE)
        assert len(before_kill) >= 100
        server.start()
        await make_stream(server.url, tmp_path)
        agent = _agent(state, server.url)
        stored: set[str] = set()
        deadline = time.monotonic() + 30
        while not set(before_kill) <= stored:
            assert time.monotonic() < deadline, f"{len(set(before_kill) - stored)} events never arrived"
            await asyncio.sleep(0.3)
            stream = await read_stream(server.url)
            ids = [mid for mid, _event in stream]
            assert len(ids) == len(set(ids)), "a Msg-Id is in the stream twice"
            stored = set(ids)
        first_boot = {mid.split(".")[1] for mid in before_kill}
        assert len(first_boot) == 1
        # Per lane (the device; the agent's own events), the old boot's events are in order.
        for lane in (("device",), ("hello", "heartbeat")):
            old = [e.seq for _mid, e in stream if e.boot in first_boot and e.kind in lane]
            assert old == sorted(old) and len(old) > 1
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        server.cleanup()
