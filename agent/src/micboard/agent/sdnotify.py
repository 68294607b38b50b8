"""systemd service notifications: READY, STATUS, WATCHDOG and STOPPING.

Uses systemd-python's ``systemd.daemon.notify`` when it is importable, else sends the
datagram to ``$NOTIFY_SOCKET`` itself (the protocol is one ``KEY=VALUE`` line per field in a
single AF_UNIX datagram; a leading ``@`` names an abstract socket). Outside systemd (no
``NOTIFY_SOCKET``) every call is a cheap no-op, so the agent runs the same in a terminal.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 1.0


def _systemd_notify() -> Callable[[str], Any] | None:
    try:
        # Imported by name: systemd-python is optional and has no type stubs.
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    notify: Callable[[str], Any] | None = getattr(daemon, "notify", None)
    return notify


class SystemdNotifier:
    """Sends service state to systemd; ``enabled`` is false outside a ``Type=notify`` unit."""

    def __init__(self, socket_path: str | None = None, *, use_systemd_python: bool = True) -> None:
        self.socket_path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._library = _systemd_notify() if use_systemd_python and socket_path is None else None
        self.sent = 0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to tell."""
        return bool(self.socket_path)

    @staticmethod
    def watchdog_interval_s() -> float | None:
        """How often to ping the watchdog (half of ``WatchdogSec``), or ``None`` when there is none."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) <= 0 or (pid.isdigit() and int(pid) != os.getpid()):
            return None
        return int(usec) / 1_000_000 / 2

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one message; returns whether it was sent."""
        if not self.enabled:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._library is not None:
                self._library(message)
            else:
                self._send(message.encode("utf-8"))
        except OSError as exc:
            self.errors += 1
            log.warning("systemd notify failed", extra={"error": str(exc)})
            return False
        self.sent += 1
        return True

    def _send(self, data: bytes) -> None:
        path = self.socket_path or ""
        address = "\0" + path[1:] if path.startswith("@") else path
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(data)

    def ready(self, status: str | None = None) -> bool:
        """The service finished starting."""
        return self.notify(ready=1, **({"status": status} if status else {}))

    def status(self, status: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(status=status)

    def watchdog(self) -> bool:
        """Still alive: resets the ``WatchdogSec`` timer."""
        return self.notify(watchdog=1)

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down."""
        return self.notify(stopping=1, **({"status": status} if status else {}))
