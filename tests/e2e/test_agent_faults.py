"""Fault tests of store-and-forward: a 30 s NATS outage, and an agent killed with SIGKILL mid-outage.

Each fault is tested twice: with a synthetic event source or the demo runner (the sender and the
outbox alone), and with the real daemon, its drivers and a simulator rack (what a venue runs).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.daemon_rig import create_stream
from tests.e2e.agent_rig import (
    DaemonRig,
    boot_of,
    final_states,
    outbox_msg_ids,
    outbox_rows,
    poll_until,
    read_stream,
    rename,
    reported_view,
    seq_of,
    simulated_view,
)

from micboard.agent.demo_source import demo_device
from micboard.agent.drivers.simulation import ReceiverSimulator
from micboard.agent.outbox import OUTBOX_FILE, Outbox
from micboard.agent.publisher import EnvelopeFactory, now_ms
from micboard.agent.sender import EventSender
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    HeartbeatBody,
    HeartbeatEvent,
    OfflineBody,
    OfflineEvent,
)
from micboard.shared.natsd import EmbeddedNats, free_port
from micboard.shared.subjects import msg_id

pytestmark = pytest.mark.slow
OUTAGE_S = 30.0


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
        await create_stream(server.url)
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
        while len(outbox_msg_ids(state / OUTBOX_FILE)) < 100:
            assert agent.poll() is None, (state / "agent.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the agent did not fill its outbox"
            await asyncio.sleep(0.1)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        before_kill = outbox_msg_ids(state / OUTBOX_FILE)
        assert len(before_kill) >= 100
        server.start()
        await create_stream(server.url)
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


# -- the real daemon, its drivers and a simulator rack ------------------------------------------


def _lane_of(event: AnyEvent) -> str:
    """The sender's lane of ``event``: its device, or "" for the agent's own events."""
    if isinstance(event, DeviceEvent | OfflineEvent):
        return event.body.device_key
    return ""


def _assert_lanes_in_seq_order(events: list[AnyEvent]) -> dict[str, list[AnyEvent]]:
    """Per lane (each device, the agent itself), stream order must be production (seq) order."""
    lanes: dict[str, list[AnyEvent]] = {}
    for event in events:
        lanes.setdefault(_lane_of(event), []).append(event)
    for lane, in_stream in lanes.items():
        seqs = [e.seq for e in in_stream]
        assert seqs == sorted(seqs), f"lane {lane or 'agent'!r}: stream order differs from seq order"
    return lanes


async def _wait_for_the_rack(rig: DaemonRig) -> dict[str, ReceiverSimulator]:
    """Wait until a snapshot of each receiver is in the stream and a heartbeat counts 3 online."""

    async def all_online() -> dict[str, ReceiverSimulator] | None:
        rig.assert_agent_running()
        stream = await rig.read_stream()
        keys = rig.keys_by_simulator(stream)
        beats = [e for _mid, e in stream if isinstance(e, HeartbeatEvent)]
        online = bool(beats) and beats[-1].body.devices_by_state.get("online") == len(rig.simulators)
        return keys if online and len(keys) == len(rig.simulators) else None

    return await poll_until(all_online, 40, "a snapshot of every receiver and all of them online")


def _key_of(keys: dict[str, ReceiverSimulator], simulator: ReceiverSimulator) -> str:
    return next(key for key, sim in keys.items() if sim is simulator)


async def test_the_daemon_with_simulators_survives_a_30_s_outage_in_order_without_gaps(
    tmp_path: Path,
) -> None:
    """``micboard-agent run`` with its drivers polls a rack (ULX-D, Axient, EW-DX) while NATS is
    down for 30 s: every state event reaches the stream once, per device in the order it was
    made, and the stream ends in the state the receivers are in."""
    rig = DaemonRig(tmp_path, site="venue-o", agent="pi-o", seed=41)
    try:
        await rig.start()
        ulxd, _ad4q, ewdx = rig.simulators
        keys = await _wait_for_the_rack(rig)
        ewdx_key, ulxd_key = _key_of(keys, ewdx), _key_of(keys, ulxd)

        # The outage. The receivers keep changing on their own (batteries drain 120x faster than
        # real time) and at the front panel (a rename per receiver every second), and the EW-DX,
        # then the ULX-D, go silent for a while: their `offline` and the snapshots after them go
        # to the outbox too. (d) also proves a Shure receiver back from a silence is reported
        # whole, not from the few values it pushes once back.
        stopped_ms = now_ms()
        await rig.stop_nats()
        outage_started = time.monotonic()
        last_names: dict[str, str] = {}
        outbox_seen = 0
        step = 0
        while (elapsed := time.monotonic() - outage_started) < OUTAGE_S:
            step += 1
            for n, sim in enumerate(rig.simulators):
                last_names[_key_of(keys, sim)] = name = f"OUT{step:03d}{n}"  # fits 8-character names
                rename(sim, 1, name)
            ewdx.faults.silent = 6.0 <= elapsed < 14.0
            ulxd.faults.silent = 16.0 <= elapsed < 24.0
            outbox_seen = max(outbox_seen, len(outbox_msg_ids(rig.outbox_path)))
            rig.assert_agent_running()
            await asyncio.sleep(min(1.0, max(0.0, OUTAGE_S - elapsed)))
        ewdx.faults.silent = ulxd.faults.silent = False
        await rig.start_nats()
        restarted_ms = now_ms()

        # Batteries stop draining: the receivers hold still, so that the stream can catch up.
        for sim in rig.simulators:
            sim.time_scale = 0.0

        missing = ["nothing checked yet"]

        async def caught_up() -> bool | None:
            rig.assert_agent_running()
            if left := len(outbox_msg_ids(rig.outbox_path)):
                missing[0] = f"{left} events in the outbox"
                return None
            stream = await rig.read_stream()
            beats = [e for _mid, e in stream if isinstance(e, HeartbeatEvent) and e.ts > restarted_ms]
            if not beats or beats[-1].body.outbox_depth != 0:
                missing[0] = "no heartbeat since the restart with an empty outbox"
                return None
            states = final_states(stream)
            for key, sim in keys.items():
                if (reported := reported_view(states[key])) != (simulated := simulated_view(sim)):
                    missing[0] = f"{key}: stream says {reported}, the receiver {simulated}"
                    return None
            return True

        await poll_until(
            caught_up,
            60,
            "the outbox drained and the stream caught up with the receivers",
            lambda: missing[0],
        )
        took = await rig.terminate_agent()
        assert took < 5.0, f"SIGTERM took {took:.2f} s"
        boot = rig.first_log_record("agent started")["boot"]
        made = rig.first_log_record("agent stopped")["events"]
        assert rig.first_log_record("sender closed")["dropped"] == 0
        if outbox_msg_ids(rig.outbox_path):
            # Events not acked when SIGTERM came wait in the outbox for the next start: it must
            # deliver them, or they would be missing from the stream below.
            rig.start_agent()

            async def delivered() -> bool | None:
                rig.assert_agent_running()
                return None if outbox_msg_ids(rig.outbox_path) else True

            await poll_until(delivered, 30, "what the first run left in the outbox delivered")
            await rig.terminate_agent()
        stream = await rig.read_stream()
        ours = [(mid, e) for mid, e in stream if e.boot == boot]
        events = [e for _mid, e in ours]

        # (a) The outage went through the outbox: events were made while NATS was down, and the
        # heartbeats made then said how deep the outbox was.
        during = [e for e in events if stopped_ms < e.ts < restarted_ms]
        beats = [e for e in during if isinstance(e, HeartbeatEvent)]
        assert len(beats) >= OUTAGE_S / rig.heartbeat_s / 2, f"{len(beats)} heartbeats in the outage"
        assert max(b.body.outbox_depth for b in beats) >= 100 and outbox_seen > 0
        for key in keys:
            changed = [e for e in during if isinstance(e, DeviceEvent) and e.body.device_key == key]
            assert len(changed) >= 10, f"{key}: only {len(changed)} device events in the outage"
        for key in (ewdx_key, ulxd_key):
            assert any(isinstance(e, OfflineEvent) and e.body.device_key == key for e in during), key

        # (b) No gap, no duplicate. Only JetStream kinds take a seq (meters go out on core NATS
        # with seq 0 and never reach the stream), so this boot's events in the stream must be
        # exactly 1..made, where `made` is what the daemon handed to its sender (its "agent
        # stopped" line): a hole, or a loss at the end, shows either way.
        assert sorted(e.seq for e in events) == list(range(1, made + 1)), "a gap or a duplicate in seq"
        ids = [mid for mid, _e in stream]
        assert len(ids) == len(set(ids)), "a Msg-Id is in the stream twice"
        assert all(mid == msg_id("pi-o", boot, e.seq) for mid, e in ours)

        # (c) Per device (and for the agent's own events) the stream holds the events in the order
        # they were made; after an `offline` the next thing a device says is a full snapshot.
        lanes = _assert_lanes_in_seq_order(events)
        for key in keys:
            lane = lanes[key]
            first = lane[0]
            assert isinstance(first, DeviceEvent) and first.body.is_snapshot, (
                f"{key} starts without a snapshot"
            )
            for before, after in itertools.pairwise(lane):
                if isinstance(before, OfflineEvent):
                    assert isinstance(after, DeviceEvent) and after.body.is_snapshot, key

        # (d) The stream ends where the receivers are: names set during the outage, and batteries.
        states = final_states(stream, boot)
        for key, sim in keys.items():
            assert reported_view(states[key]) == simulated_view(sim), key
            channel = states[key].channel(1)
            assert channel is not None and channel.name == last_names[key]
    finally:
        await rig.close()


async def test_the_daemon_killed_mid_outage_drains_its_outbox_after_restart(tmp_path: Path) -> None:
    """The daemon is SIGKILLed with >= 100 events in its outbox; started again from the same state
    directory it delivers each of them exactly once, and its outbox ends empty."""
    rig = DaemonRig(tmp_path, site="venue-k", agent="pi-k2", seed=43, heartbeat_s=0.25)
    try:
        await rig.start()
        keys = await _wait_for_the_rack(rig)
        await rig.stop_nats()
        step = 0

        async def filled() -> bool | None:
            # Renames at the front panel on top of the draining batteries: device events to keep.
            nonlocal step
            step += 1
            for n, sim in enumerate(rig.simulators):
                rename(sim, 1, f"K{step:04d}{n}")
            rig.assert_agent_running()
            rows = outbox_rows(rig.outbox_path)
            devices = {row.device_key for row in rows if row.kind == "device"}
            return True if len(rows) >= 100 and devices == set(keys) else None

        await poll_until(filled, 40, "100 events of every receiver in the outbox")
        await rig.kill_agent()
        noted = outbox_rows(rig.outbox_path)
        assert len(noted) >= 100
        noted_ids = {row.msg_id for row in noted}
        boot = rig.first_log_record("agent started")["boot"]
        assert {boot_of(mid) for mid in noted_ids} == {boot}
        assert not rig.log_records("agent stopped"), "SIGKILL leaves no chance to stop"

        await rig.start_nats()
        rig.start_agent()

        async def drained() -> list[tuple[str, AnyEvent]] | None:
            rig.assert_agent_running()
            stream = await rig.read_stream()
            ids = [mid for mid, _e in stream]
            assert len(ids) == len(set(ids)), "a Msg-Id is in the stream twice"
            if not noted_ids <= set(ids) or outbox_rows(rig.outbox_path):
                return None
            return stream

        stream = await poll_until(drained, 30, "every noted event in the stream and the outbox empty")
        # Nothing of the killed boot is missing in the middle: what it had published before the
        # outage and what the outbox kept through SIGKILL make one unbroken run of seqs. (The kill
        # may only lose the newest events, those of the last outbox commit interval.)
        old = [e for _mid, e in stream if e.boot == boot]
        newest = max(seq_of(mid) for mid in noted_ids)
        assert sorted(e.seq for e in old) == list(range(1, newest + 1))
        _assert_lanes_in_seq_order(old)
        assert len(rig.log_records("agent started")) == 2
        took = await rig.terminate_agent()
        assert took < 5.0, f"SIGTERM took {took:.2f} s"
    finally:
        await rig.close()
