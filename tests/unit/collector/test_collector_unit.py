"""The collector's systemd unit and installer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "systemd" / "micboard-collector.service"


def test_unit_file_has_the_hardening_it_promises() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure", "DynamicUser=yes",
        "StateDirectory=micboard-collector", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "EnvironmentFile=-/etc/micboard/collector.env",
        "ExecStart=/opt/micboard-collector/bin/micboard-collector run",
        "Environment=MICBOARD_STATE_DIR=/var/lib/micboard-collector",
    ):  # fmt: skip
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this environment's collector.
    collector = Path(sys.executable).parent / "micboard-collector"
    unit = tmp_path / "micboard-collector.service"
    unit.write_text(
        UNIT.read_text().replace("/opt/micboard-collector/bin/micboard-collector", str(collector))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "micboard-collector.service" not in result.stderr, result.stderr


def test_installer_is_valid_shell_and_its_template_is_valid_settings(tmp_path: Path) -> None:
    script = ROOT / "deploy" / "collector" / "install.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        ["sh", "-n", str(script)], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr
    template = ROOT / "deploy" / "collector" / "collector.env"
    # The template, sourced as systemd's EnvironmentFile would be, passes the collector's check
    # of its settings (the database and NATS checks then report what is not there).
    env = {"PATH": os.environ.get("PATH", ""), "MICBOARD_STATE_DIR": str(tmp_path)}
    for line in template.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    result = subprocess.run(
        [str(Path(sys.executable).parent / "micboard-collector"), "check"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert "ok   settings: valid" in result.stdout, result.stdout + result.stderr
