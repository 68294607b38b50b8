"""The README's demo command: everything starts and the API lists the agent's device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_the_device(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--check",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "micboard demo is running: open http://127.0.0.1:" in result.stdout
    assert "3 device(s) listed" in result.stdout
    assert "collector ready" in result.stderr and "agent started" in result.stderr
    assert (tmp_path / "state" / "micboard.db").is_file()
