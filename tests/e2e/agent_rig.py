"""A rig for fault tests of the agent: a nats-server, a simulator rack and ``micboard-agent run``.

The simulators run in the test's own event loop, so that the test drives them (renames, a
receiver that goes silent, batteries that stop draining) and reads the state they are in to
compare it with what reached the stream. The agent runs as a real child process with its drivers,
so that SIGTERM and SIGKILL mean what they mean on a Raspberry Pi. NATS is started and stopped
in a worker thread: :class:`EmbeddedNats` blocks while it waits, and the simulators must keep
answering meanwhile (a stalled loop would look to the agent like receivers going silent).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import nats
from tests.daemon_rig import create_stream

from micboard.agent.drivers.sennheiser import SscSimulator
from micboard.agent.drivers.shure import ShureSimulator
from micboard.agent.drivers.simulation import ReceiverSimulator
from micboard.agent.outbox import OUTBOX_FILE
from micboard.agent.simulate import SimulatorRack
from micboard.shared.codec import decode
from micboard.shared.envelope import AnyEvent, DeviceEvent
from micboard.shared.model import Device, apply_changes
from micboard.shared.natsd import EmbeddedNats

STREAM = "MICBOARD"
RACK = ("ulxd4d", "ad4q", "ewdx-em2")
"""Two Shure families (ULX-D, Axient Digital) and one Sennheiser, as issue 4 asks."""

_T = TypeVar("_T")


async def read_stream(url: str) -> list[tuple[str, AnyEvent]]:
    """The whole stream in stream order, read with an ephemeral pull consumer: (Msg-Id, event)."""
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


class OutboxRow(NamedTuple):
    """One event waiting in the agent's outbox."""

    msg_id: str
    kind: str
    device_key: str | None


def outbox_rows(path: Path) -> list[OutboxRow]:
    """Every event in the outbox at ``path``, oldest first.

    Read-only, so that the test never holds a write lock the agent waits for; an outbox not
    created yet reads as empty.
    """
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        query = "SELECT msg_id, kind, device_key FROM events ORDER BY id"
        return [OutboxRow(*row) for row in db.execute(query)]
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        db.close()


def outbox_msg_ids(path: Path) -> list[str]:
    """The Msg-Ids of the events in the outbox at ``path``, oldest first."""
    return [row.msg_id for row in outbox_rows(path)]


def seq_of(msg_id: str) -> int:
    """The ``seq`` part of a Msg-Id ``<agent>.<boot>.<seq>``."""
    return int(msg_id.rsplit(".", 1)[1])


def boot_of(msg_id: str) -> str:
    """The ``boot`` part of a Msg-Id ``<agent>.<boot>.<seq>``."""
    return msg_id.split(".")[1]


async def poll_until(
    check: Callable[[], Awaitable[_T | None]],
    timeout_s: float,
    what: str,
    explain: Callable[[], str] | None = None,
) -> _T:
    """Call ``check`` every 0.3 s until it returns something other than ``None``; return that.

    Fails the test with ``what`` (and ``explain()``: what was still missing) after ``timeout_s``.
    Generous deadlines: two shared cores run the agent, nats-server and the simulators at once.
    """
    deadline = time.monotonic() + timeout_s
    while (result := await check()) is None:
        if time.monotonic() > deadline:
            missing = f" ({explain()})" if explain is not None else ""
            raise AssertionError(f"{what}: not reached within {timeout_s:g} s{missing}")
        await asyncio.sleep(0.3)
    return result


def final_states(stream: Sequence[tuple[str, AnyEvent]], boot: str | None = None) -> dict[str, Device]:
    """Each device's state as a consumer that applies the stream in order ends up with.

    Snapshots replace, deltas are applied; with ``boot``, only that boot's events count.
    """
    states: dict[str, Device] = {}
    for _mid, event in stream:
        if not isinstance(event, DeviceEvent) or (boot is not None and event.boot != boot):
            continue
        body = event.body
        if body.snapshot is not None:
            states[body.device_key] = body.snapshot
        elif body.changes is not None and body.device_key in states:
            states[body.device_key] = apply_changes(states[body.device_key], body.changes)
    return states


def rename(simulator: ReceiverSimulator, index: int, name: str) -> None:
    """Rename channel ``index`` at the simulated front panel."""
    if isinstance(simulator, ShureSimulator):
        simulator.set_name(index, name)
    elif isinstance(simulator, SscSimulator):
        simulator.set_channel_name(index, name)
    else:  # pragma: no cover - the rack holds only these two
        raise TypeError(type(simulator).__name__)


def simulated_view(simulator: ReceiverSimulator) -> dict[int, tuple[str, int | None]]:
    """Per channel: the name and the battery percent (``None`` with the transmitter off)."""
    view: dict[int, tuple[str, int | None]] = {}
    if isinstance(simulator, ShureSimulator):
        for channel in simulator.channels:
            view[channel.index] = (channel.name, channel.battery_percent if channel.tx_on else None)
    elif isinstance(simulator, SscSimulator):
        simulator.tree()  # brings the battery up to date, as a read by the driver does
        for ssc in simulator.channels:
            tx = ssc.transmitter
            view[ssc.index] = (ssc.name, tx.gauge_percent if tx.on else None)
    return view


def reported_view(device: Device) -> dict[int, tuple[str, int | None]]:
    """Per channel: the name and the battery percent the agent reported for ``device``."""
    return {
        channel.index: (
            channel.name or "",
            channel.transmitter.battery_percent if channel.transmitter is not None else None,
        )
        for channel in device.channels
    }


class DaemonRig:
    """A nats-server with the stream, a rack of simulators, and the agent daemon as a child process.

    ``time_scale`` speeds the simulated batteries up so that they change several times a second;
    random events are off (``activity=0``) so that every other change is one the test makes.
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        site: str,
        agent: str,
        seed: int,
        time_scale: float = 120.0,
        heartbeat_s: float = 0.5,
        snapshot_s: float = 5.0,
        silence_s: float = 2.0,
    ) -> None:
        self.tmp_path = tmp_path
        self.site = site
        self.agent_name = agent
        # Its port is chosen once: a restart after stop() listens where the agent reconnects to.
        self.server = EmbeddedNats(store_dir=tmp_path / "nats")
        self.rack = SimulatorRack(
            RACK, seed=seed, time_scale=time_scale, activity=0.0, announce=False, fixed_ports=False
        )
        self.state_dir = tmp_path / "agent"
        self.state_dir.mkdir()
        self.log_path = tmp_path / "agent.log"
        self.heartbeat_s = heartbeat_s
        self.snapshot_s = snapshot_s
        self.silence_s = silence_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def outbox_path(self) -> Path:
        """The agent's outbox in its state directory."""
        return self.state_dir / OUTBOX_FILE

    @property
    def simulators(self) -> list[ReceiverSimulator]:
        """The running simulators, in :data:`RACK` order."""
        return self.rack.simulators

    async def start(self) -> None:
        """Start NATS with the stream, the rack and the agent."""
        await self.start_nats()
        await create_stream(self.server.url)
        await self.rack.start()
        self.start_agent()

    async def start_nats(self) -> None:
        """Start nats-server (again: same port, same store)."""
        await asyncio.to_thread(self.server.start)

    async def stop_nats(self) -> None:
        """Stop nats-server gracefully; its store is kept for the restart."""
        await asyncio.to_thread(self.server.stop)

    def env(self) -> dict[str, str]:
        """The agent's settings: the rack as static devices, short timings, JSON logs."""
        return {
            **os.environ,
            "MICBOARD_SITE": self.site,
            "MICBOARD_AGENT": self.agent_name,
            "MICBOARD_NATS_URL": self.server.url,
            "MICBOARD_STATE_DIR": str(self.state_dir),
            "MICBOARD_DISCOVERY_MDNS": "false",
            "MICBOARD_DISCOVERY_SLP": "false",
            "MICBOARD_STATIC_DEVICES": json.dumps(self.rack.static_devices()),
            "MICBOARD_HEARTBEAT_INTERVAL_S": str(self.heartbeat_s),
            "MICBOARD_SNAPSHOT_INTERVAL_S": str(self.snapshot_s),
            "MICBOARD_PUBLISH_TIMEOUT_S": "1",
            "MICBOARD_NATS_CONNECT_TIMEOUT_S": "1",
            "MICBOARD_SILENCE_TIMEOUT_S": str(self.silence_s),
            # The Sennheiser driver re-reads its channels every poll: once a second, not every 5 s.
            "MICBOARD_POLL_INTERVAL_S": "1",
            "MICBOARD_CONNECT_TIMEOUT_S": "1",
            "MICBOARD_RECONNECT_BACKOFF_INITIAL_S": "0.2",
            "MICBOARD_RECONNECT_BACKOFF_MAX_S": "1",
            "MICBOARD_LOG_FORMAT": "json",
        }

    def start_agent(self) -> None:
        """Start ``micboard-agent run`` from the rig's state directory (appending to its log)."""
        assert self.process is None or self.process.poll() is not None, "the agent runs already"
        # A file, not a pipe: a pipe nobody reads while the agent runs could fill and block it.
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [sys.executable, "-m", "micboard.agent.cli", "run"],
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the agent's log, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_records(self, message: str) -> list[dict[str, Any]]:
        """The agent's JSON log records with ``msg == message``, oldest first (every boot)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a log record (a traceback line, say)
            if isinstance(record, dict) and record.get("msg") == message:
                records.append(record)
        return records

    def first_log_record(self, message: str) -> dict[str, Any]:
        """The first JSON log record with ``msg == message``; fails with the log if there is none."""
        records = self.log_records(message)
        assert records, f"no {message!r} in the agent's log:\n{self.log_tail()}"
        return records[0]

    def assert_agent_running(self) -> None:
        """Fail with the agent's log if it has exited."""
        assert self.process is not None and self.process.poll() is None, self.log_tail()

    async def kill_agent(self) -> None:
        """SIGKILL the agent, as a power cut or the OOM killer would."""
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        await self._wait_exit(process, 10.0)

    async def terminate_agent(self) -> float:
        """SIGTERM the agent; assert it exits 0; return how long it took in seconds."""
        process = self.process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await self._wait_exit(process, 10.0)
        took = time.monotonic() - started
        assert code == 0, f"exit code {code}\n{self.log_tail()}"
        return took

    @staticmethod
    async def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int:
        # Polled, not process.wait(): the simulators in this loop keep answering meanwhile.
        deadline = time.monotonic() + timeout_s
        while (code := process.poll()) is None:
            assert time.monotonic() < deadline, f"the agent did not exit within {timeout_s:g} s"
            await asyncio.sleep(0.02)
        return code

    async def read_stream(self) -> list[tuple[str, AnyEvent]]:
        """The whole stream, in stream order."""
        return await read_stream(self.server.url)

    def keys_by_simulator(self, stream: Sequence[tuple[str, AnyEvent]]) -> dict[str, ReceiverSimulator]:
        """Device key -> simulator, matched by the port each snapshot reports."""
        by_port = {sim.port: sim for sim in self.simulators}
        keys: dict[str, ReceiverSimulator] = {}
        for _mid, event in stream:
            if isinstance(event, DeviceEvent) and event.body.snapshot is not None:
                port = event.body.snapshot.port
                if port in by_port:
                    keys[event.body.device_key] = by_port[port]
        return keys

    async def close(self) -> None:
        """Kill the agent if it still runs, stop the rack and the server, remove nothing else."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            await self._wait_exit(process, 10.0)
        await self.rack.stop()
        await asyncio.to_thread(self.server.cleanup)
