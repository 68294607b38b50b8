"""``micboard-collector check`` against a real nats-server that runs without JetStream."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micboard.collector.preflight import CheckExit, CheckResult, check_nats, exit_code, run_checks
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats, find_nats_server, free_port


@pytest.fixture
def plain_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server without JetStream, on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port), "-l", str(tmp_path / "nats.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_a_server_without_jetstream_fails_the_nats_check(plain_nats: str, sqlite_url: str) -> None:
    settings = CollectorSettings(nats_url=plain_nats, database_url=sqlite_url)
    result = await check_nats(settings)
    assert not result.ok and result.exit_code is CheckExit.NATS_UNREACHABLE
    assert result.detail.startswith(f"{plain_nats} answers but JetStream does not")
    assert result.line().startswith("FAIL nats: ")
    # The whole check: settings fine, an empty SQLite file that `run` migrates itself, NATS wrong.
    results = await run_checks(settings)
    assert [(r.name, r.ok) for r in results] == [
        ("settings", True),
        ("database", True),
        ("schema", True),
        ("nats", False),
    ]
    assert exit_code(results) == int(CheckExit.NATS_UNREACHABLE)


async def test_a_jetstream_server_passes(nats_server: EmbeddedNats, sqlite_url: str) -> None:
    url = nats_server.url
    result = await check_nats(CollectorSettings(nats_url=url, database_url=sqlite_url))
    assert result.ok and result.detail.startswith(f"{url} reachable, JetStream with")
    assert exit_code([result, CheckResult("x", True, "fine")]) == 0
