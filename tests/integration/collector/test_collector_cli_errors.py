"""``micboard-collector`` facing what is not there: a NATS server that is down, a database that is
unreachable or misnamed, a state directory that is a file. One line and an exit code, never a
traceback, and a signal always ends ``run``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micboard.collector import cli
from micboard.collector.app import NatsLog
from micboard.shared.natsd import EmbeddedNats, free_port


def test_run_waiting_for_a_nats_server_that_is_down_ends_on_sigterm(tmp_path: Path) -> None:
    log_file = tmp_path / "collector.log"
    env = {
        **os.environ,
        "MICBOARD_STATE_DIR": str(tmp_path / "state"),
        "MICBOARD_NATS_URL": f"nats://127.0.0.1:{free_port()}",  # nothing listens there
        "MICBOARD_HTTP_PORT": "0",
    }
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "micboard.collector.cli", "run"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while b"nats error" not in log_file.read_bytes():
                assert process.poll() is None, log_file.read_text()
                assert time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.1)
            time.sleep(2.5)  # a few more failed attempts, one a second
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log_file.read_text()
    assert "Traceback" not in text
    assert text.count("nats error") == 1  # the same error again is not logged again at once
    assert "ConnectionRefusedError" in text
    assert "stopped before the collector was ready" in text


def test_run_with_its_http_port_taken_is_one_line_and_exit_1(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("MICBOARD_NATS_URL", nats_server.url)
        monkeypatch.setenv("MICBOARD_HTTP_PORT", str(taken.getsockname()[1]))
        assert cli.main(["run"]) == 1
    # The log lines of the start (on stderr too), then one line that says why it stopped.
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("micboard-collector: cannot start: OSError: ")
    assert "address already in use" in err[-1] and not any("Traceback" in line for line in err)


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MICBOARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.mark.parametrize("argv", [["migrate"], ["token", "list"], ["thresholds", "show", "hall"]])
def test_an_unreachable_database_is_one_line_and_exit_3(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv("MICBOARD_DATABASE_URL", f"postgresql+asyncpg://mb:pw-1234@127.0.0.1:{free_port()}/x")
    assert cli.main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("micboard-collector: database or state directory unusable: ")
    assert "\n" not in err and "pw-1234" not in err


def test_a_state_directory_that_is_a_file_is_one_line_and_exit_3(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = clean_env / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(blocker))
    assert cli.main(["token", "list"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("micboard-collector: database or state directory unusable: FileExistsError")


def test_a_misnamed_database_or_revision_is_one_line_and_exit_2(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICBOARD_DATABASE_URL", "not a url with pw-1234")
    for argv in (["check"], ["migrate"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "database_url: Value error, not a database URL" in err and "pw-1234" not in err
    monkeypatch.delenv("MICBOARD_DATABASE_URL")
    assert cli.main(["migrate", "--revision", "bogus"]) == 2
    assert (
        capsys.readouterr().err.strip().endswith("CommandError: Can't locate revision identified by 'bogus'")
    )


async def test_the_same_nats_error_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    nats_log = NatsLog(every_s=3600)
    with caplog.at_level(logging.INFO, logger="micboard.collector.app"):
        for _ in range(5):
            await nats_log.error(ConnectionRefusedError(111, "refused"))
        await nats_log.error(TimeoutError("slow"))
        await nats_log.disconnected()
        await nats_log.reconnected()
        nats_log.closing = True  # an orderly close is reported as a disconnection too
        await nats_log.disconnected()
    assert [r.getMessage() for r in caplog.records] == [
        "nats error",
        "nats error",
        "nats disconnected; reconnecting",
        "nats reconnected",
        "nats connection closed",
    ]
    assert [getattr(r, "error", None) for r in caplog.records[:2]] == [
        "ConnectionRefusedError: [Errno 111] refused",
        "TimeoutError: slow",
    ]
    caplog.clear()
    nats_log.every_s = 0.0  # the interval has passed: logged again, with how often it recurred
    with caplog.at_level(logging.INFO, logger="micboard.collector.app"):
        await nats_log.error(ConnectionRefusedError(111, "refused"))
    [record] = caplog.records
    assert getattr(record, "repeated", None) == 4


async def test_distinct_nats_errors_without_end_keep_the_memory_bounded() -> None:
    nats_log = NatsLog(every_s=3600)
    for n in range(250):
        await nats_log.error(OSError(f"error {n}"))
    assert len(nats_log._throttle._last) <= 101
