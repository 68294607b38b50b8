"""The metrics endpoint over real HTTP, and the unit file."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from micboard.agent.metrics import Metric, MetricsServer, render
from micboard.agent.settings import load_agent_settings

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "systemd" / "micboard-agent.service"


def test_prometheus_text() -> None:
    text = render(
        [
            Metric("micboard_agent_devices", "Devices by state.", "gauge")
            .add(2, state="online")
            .add(1, state="off"),
            Metric("micboard_agent_uptime_seconds", "Uptime.", "gauge").add(1.5),
            Metric("x_total", "Escapes.", "counter").add(3, label='a"b\\c'),
        ]
    )
    assert text.splitlines() == [
        "# HELP micboard_agent_devices Devices by state.",
        "# TYPE micboard_agent_devices gauge",
        'micboard_agent_devices{state="online"} 2',
        'micboard_agent_devices{state="off"} 1',
        "# HELP micboard_agent_uptime_seconds Uptime.",
        "# TYPE micboard_agent_uptime_seconds gauge",
        "micboard_agent_uptime_seconds 1.5",
        "# HELP x_total Escapes.",
        "# TYPE x_total counter",
        'x_total{label="a\\"b\\\\c"} 3',
    ]


async def http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


async def test_metrics_server_answers_on_loopback() -> None:
    server = MetricsServer(lambda: [Metric("up", "Up.", "gauge").add(1)], port=0)
    await server.start()
    try:
        head, body = await http_get(server.port, "/metrics")
        assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
        assert body == "# HELP up Up.\n# TYPE up gauge\nup 1\n"
        head, _ = await http_get(server.port, "/other")
        assert head.startswith("HTTP/1.1 404")
        # A client that connects and says nothing does not hold the server up.
        _idle_reader, idle = await asyncio.open_connection("127.0.0.1", server.port)
        head, _ = await http_get(server.port, "/")
        assert head.startswith("HTTP/1.1 200")
    finally:
        await server.close()
        idle.close()
    assert server.requests == 3


def test_unit_file_has_the_hardening_it_promises() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify", "WatchdogSec=30", "Restart=on-failure", "DynamicUser=yes",
        "StateDirectory=micboard-agent", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "NoNewPrivileges=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "CapabilityBoundingSet=\n", "EnvironmentFile=-/etc/micboard/agent.env",
    ):  # fmt: skip
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this environment's agent.
    agent = Path(sys.executable).parent / "micboard-agent"
    unit = tmp_path / "micboard-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/micboard-agent/bin/micboard-agent", str(agent)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "micboard-agent.service" not in result.stderr, result.stderr


def test_pi_installer_is_valid_shell() -> None:
    script = ROOT / "deploy" / "pi" / "install.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        ["sh", "-n", str(script)], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr
    for template in ("agent.toml", "agent.env"):
        assert (ROOT / "deploy" / "pi" / template).is_file()
    settings = load_agent_settings(ROOT / "deploy" / "pi" / "agent.toml")
    assert settings.site == "my-venue" and settings.interfaces == ["127.0.0.1"]
