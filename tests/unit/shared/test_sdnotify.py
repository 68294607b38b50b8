"""systemd notify protocol over a real unix datagram socket standing in for the service manager."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from micboard.shared.sdnotify import SystemdNotifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's NOTIFY_SOCKET is."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def test_ready_watchdog_status_stopping_reach_the_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("listening")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("ingesting")
    assert sock.recv(4096) == b"STATUS=ingesting"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_abstract_socket_address() -> None:
    name = f"micboard-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s() is None
    # A socket that went away is logged, never raised.
    assert SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).watchdog() is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000"}
    assert SystemdNotifier(env).watchdog_interval_s() == 10.0
    assert SystemdNotifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 10.0
    assert SystemdNotifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval_s() is None
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "nonsense"}).watchdog_interval_s() is None
