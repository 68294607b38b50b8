"""The README's demo command: everything starts and the API lists the agent's devices."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from micboard.collector.store import migrate
from micboard.collector.store.database import create_engine
from micboard.shared.natsd import free_port

ROOT = Path(__file__).resolve().parents[2]


def _demo(
    state: Path, rack_port_base: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--check", "--port", "0"]
    command += ["--state-dir", str(state), "--rack-port-base", str(rack_port_base)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=90, check=False, env={**os.environ, **(env or {})}
    )


def test_demo_serves_the_devices_and_the_same_ones_when_started_again(tmp_path: Path) -> None:
    base = free_port()
    result = _demo(tmp_path / "state", base)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "micboard demo is running: open http://127.0.0.1:" in result.stdout
    assert "3 device(s) listed" in result.stdout
    assert "collector ready" in result.stderr and "agent started" in result.stderr
    assert (tmp_path / "state" / "micboard.db").is_file()
    # Over the same state: the simulators come back at the same addresses, so the collector
    # knows their receivers (three devices, not three old ones beside three new ones).
    again = _demo(tmp_path / "state", base)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3 device(s) listed" in again.stdout
    assert f"127.0.0.1-{base}" in again.stderr  # the receivers' keys name their ports


def test_demo_migrates_its_own_older_database(tmp_path: Path) -> None:
    # A demo state directory from an earlier version: the demo brings its database up to date.
    state = tmp_path / "state"
    state.mkdir()

    async def at_0005() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{state / 'micboard.db'}")
        try:
            await migrate.upgrade(engine, "0005")
        finally:
            await engine.dispose()

    asyncio.run(at_0005())
    result = _demo(state, free_port())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 device(s) listed" in result.stdout


def test_demo_stops_at_once_when_a_service_cannot_start(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _demo(tmp_path / "state", free_port(), env={"MICBOARD_MAX_DELIVER": "0"})
    assert result.returncode != 0
    assert "demo: micboard-collector stopped (exit code 2)" in result.stderr
    assert "max_deliver" in result.stderr  # the collector's own error, above the demo's line
    assert time.monotonic() - started < 25  # not the 30 s wait for devices
