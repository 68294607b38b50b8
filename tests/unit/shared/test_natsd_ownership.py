"""The launcher: ready means its own server is; a failure leaves nothing; only its own ports are retried."""

from __future__ import annotations

import logging
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from micboard.shared.errors import ErrorCode, NatsServerError
from micboard.shared.natsd import EmbeddedNats

LOGGER = "micboard.shared.natsd"


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the launcher's own store directories go (tempfile.mkdtemp), to count them."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port held by another process (a plain listening socket)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def _starts(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.name == LOGGER and r.getMessage() == "starting nats-server" for r in caplog.records)


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- A: ready means our server is ready ------------------------------------------------------


def test_another_server_on_the_monitor_port_is_not_taken_for_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its /healthz answers 200 while ours, unable to bind the port, exits: the start fails."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with EmbeddedNats(store_dir=tmp_path / "a") as other:
        ours = EmbeddedNats(store_dir=tmp_path / "b", monitor_port=other.monitor_port, ready_timeout_s=10)
        with pytest.raises(NatsServerError) as info:
            ours.start()
        assert info.value.code is ErrorCode.NATS_SERVER_FAILED
        assert f"monitoring port 127.0.0.1:{other.monitor_port}, already in use" in info.value.message
        assert "[FTL]" in info.value.message  # the log line that says why
        assert not ours.running and other.running
        assert _starts(caplog) == 2  # the other server's and ours: a port given is not chosen again


def test_a_process_of_ours_that_never_reports_its_ports_is_not_ready(tmp_path: Path) -> None:
    """Alive, with another server's /healthz answering 200 on the monitor port: still not ready.

    Only the ports file our own process writes (named by its pid, once its listeners are up)
    makes the port ours; the check of the process alone could not tell.
    """
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with EmbeddedNats(store_dir=tmp_path / "a") as other:
        ours = EmbeddedNats(store_dir=tmp_path / "b", monitor_port=other.monitor_port, ready_timeout_s=1)
        ours.binary = fake  # the venv's binary comes first in the search; this one stays up, silent
        with pytest.raises(NatsServerError) as info:
            ours.start()
        assert info.value.code is ErrorCode.NATS_SERVER_FAILED
        assert "not ready within 1 s" in info.value.message
        assert "has not reported its ports" in info.value.message
        assert not ours.running


def test_the_ports_file_is_not_left_behind(tmp_path: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "store")
    with server:
        assert server.command()[-2:] == ["--ports_file_dir", str(tmp_path / "store")]
        assert len(list((tmp_path / "store").glob("*.ports"))) == 1
        server.kill()  # a killed server leaves its file: the launcher removes it
        assert not list((tmp_path / "store").glob("*.ports"))
        server.start()
    assert not list((tmp_path / "store").glob("*.ports"))


# -- B: nothing left behind ------------------------------------------------------------------


def test_a_missing_binary_leaves_no_store_directory(tmp_path: Path, temp_root: Path) -> None:
    with pytest.raises(NatsServerError) as info:
        EmbeddedNats(binary=tmp_path / "missing" / "nats-server")
    assert info.value.code is ErrorCode.NATS_SERVER_NOT_FOUND
    assert not list(temp_root.iterdir())


def test_a_start_failing_in_a_with_block_removes_its_own_store(
    temp_root: Path, listener: socket.socket
) -> None:
    port = int(listener.getsockname()[1])
    server = EmbeddedNats(port=port)
    store = server.store_dir
    assert store.parent == temp_root
    with pytest.raises(NatsServerError) as info, server:
        pytest.fail("not reached: the start fails")  # pragma: no cover
    assert not list(temp_root.iterdir())
    # The log went with the store: the message quotes it instead of pointing at it.
    assert str(store) not in info.value.message and "[FTL]" in info.value.message
    # The object can still be started once the port is free, in a store of its own again.
    listener.close()
    with server:
        assert server.running and store.is_dir()
    assert not store.exists()


def test_a_failed_start_keeps_a_store_the_caller_gave(tmp_path: Path, listener: socket.socket) -> None:
    server = EmbeddedNats(port=int(listener.getsockname()[1]), store_dir=tmp_path / "store")
    with pytest.raises(NatsServerError) as info:
        server.start()
    assert (tmp_path / "store").is_dir()
    assert f"see {tmp_path / 'store' / 'nats-server.log'}" in info.value.message


def test_a_failed_restart_keeps_its_own_store(temp_root: Path) -> None:
    """After a successful start the store holds streams: a failed restart does not remove them."""
    server = EmbeddedNats().start()
    try:
        port, store = server.port, server.store_dir
        server.kill()
        with socket.socket() as blocker:
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            with pytest.raises(NatsServerError) as info:
                server.start()
        # C as well: a port settled by the first start is not chosen again.
        assert f"client port 127.0.0.1:{port}, already in use" in info.value.message
        assert "a restart keeps its ports" in info.value.message
        assert server.port == port and store.is_dir() and (store / "jetstream").is_dir()
        server.start()
        assert server.running and server.port == port
    finally:
        server.cleanup()
    assert not list(temp_root.iterdir())


# -- C: only ports the launcher chose are chosen again ---------------------------------------


def test_a_taken_client_port_given_fails_at_once_naming_it(
    tmp_path: Path, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = int(listener.getsockname()[1])
    server = EmbeddedNats(port=port, store_dir=tmp_path / "store")
    with pytest.raises(NatsServerError) as info:
        server.start()
    assert info.value.code is ErrorCode.NATS_SERVER_FAILED
    assert info.value.message.startswith(f"nats-server cannot listen on its client port 127.0.0.1:{port}, ")
    assert "another process holds it" in info.value.message and "exited with code" in info.value.message
    assert _starts(caplog) == 1 and _retries(caplog) == []
    assert server.port == port and not server.running


def test_a_taken_monitor_port_given_fails_at_once_though_the_client_port_was_chosen(
    tmp_path: Path, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry is for ports chosen here; choosing the client port again cannot free the monitor's."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = int(listener.getsockname()[1])
    server = EmbeddedNats(monitor_port=port, store_dir=tmp_path / "store")
    with pytest.raises(NatsServerError) as info:
        server.start()
    assert f"monitoring port 127.0.0.1:{port}, already in use" in info.value.message
    assert _starts(caplog) == 1 and _retries(caplog) == []


def test_the_monitor_port_chosen_differs_from_the_client_port(monkeypatch: pytest.MonkeyPatch) -> None:
    offered = iter([41001, 41001, 41001, 41002])
    monkeypatch.setattr("micboard.shared.natsd.free_port", lambda host="127.0.0.1": next(offered))
    server = EmbeddedNats(store_dir=Path("/nonexistent-never-created"))
    assert (server.port, server.monitor_port) == (41001, 41002)
