"""More launcher and notifier paths: a config file, a slow stop, a missing log, systemd-python lookup."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from micboard.shared.errors import ErrorCode, NatsServerError
from micboard.shared.natsd import EmbeddedNats
from micboard.shared.sdnotify import SystemdNotifier, _systemd_python


def _varz(server: EmbeddedNats) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as response:
        data: dict[str, object] = json.loads(response.read())
    return data


def test_config_file_is_passed_to_the_server(tmp_path: Path) -> None:
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 4096\n")
    server = EmbeddedNats(store_dir=tmp_path / "store", config_file=config, server_name="cfg-test")
    cmd = server.command()
    assert cmd[1:3] == ["-c", str(config)]
    with server:
        varz = _varz(server)
        assert varz["max_payload"] == 4096
        assert varz["server_name"] == "cfg-test"
    assert not server.running


def test_stop_that_times_out_kills_the_server(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "store").start()
    port = server.port
    # No time to shut down gracefully: stop() falls back to SIGKILL and still reaps the process.
    server.stop(timeout_s=0.0)
    assert not server.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass
    server.kill()  # nothing left to kill: harmless


def test_start_failure_without_a_log_file_says_so(tmp_path: Path) -> None:
    # The log file's directory does not exist: the server cannot start and leaves no log to quote.
    server = EmbeddedNats(store_dir=tmp_path / "store", log_file=tmp_path / "missing" / "dir" / "nats.log")
    with pytest.raises(NatsServerError) as info:
        server.start()
    assert info.value.code is ErrorCode.NATS_SERVER_FAILED
    assert "exited" in info.value.message and "no log" in info.value.message
    assert not server.running


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path where a ``systemd`` package can be written; cleaned out of sys.modules."""
    root = tmp_path / "site"
    (root / "systemd").mkdir(parents=True)
    (root / "systemd" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    for name in ("systemd", "systemd.daemon"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield root / "systemd"
    for name in ("systemd", "systemd.daemon"):
        sys.modules.pop(name, None)


def test_another_systemd_package_without_notify_is_ignored(
    fake_systemd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_systemd / "daemon.py").write_text("notify = 'not callable'\n")
    assert _systemd_python() is None
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier().notify("READY=1") is False


def test_systemd_python_is_used_with_the_real_environment(
    fake_systemd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = tmp_path / "sent.txt"
    (fake_systemd / "daemon.py").write_text(
        "from pathlib import Path\n"
        "def notify(state):\n"
        f"    with Path({str(sent)!r}).open('a') as f:\n"
        "        f.write(state + '|')\n"
        "    return True\n"
    )
    native = _systemd_python()
    assert native is not None and callable(native)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notifier = SystemdNotifier()
    assert notifier.ready("up") is True and notifier.watchdog() is True
    assert sent.read_text() == "READY=1\nSTATUS=up|WATCHDOG=1|"
    # With an explicit environment, or when asked not to, the datagram path is used instead.
    assert SystemdNotifier(use_systemd_python=False).watchdog() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "x.sock")}).watchdog() is False
    assert sent.read_text() == "READY=1\nSTATUS=up|WATCHDOG=1|"
