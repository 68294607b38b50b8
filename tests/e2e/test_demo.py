"""The README's demo command: everything starts and the API lists the agent's devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from micboard.shared.natsd import free_port

ROOT = Path(__file__).resolve().parents[2]


def _demo(state: Path, rack_port_base: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--check", "--port", "0"]
    command += ["--state-dir", str(state), "--rack-port-base", str(rack_port_base)]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


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
