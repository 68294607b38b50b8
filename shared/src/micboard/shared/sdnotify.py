"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): READY, WATCHDOG, STOPPING, STATUS.

Uses systemd-python when it is installed, else a datagram to ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``). Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _systemd_python() -> Callable[[str], bool] | None:
    # Optional: systemd-python when the system has it. Another package may own the name
    # ``systemd``, so only a module that really has ``daemon.notify`` counts.
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    notify = getattr(daemon, "notify", None)
    return notify if callable(notify) else None


class SystemdNotifier:
    """Sends notify messages to the service manager that started this process, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, use_systemd_python: bool = True) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        # systemd-python reads the environment itself, so it is only used with the real one.
        self._native = _systemd_python() if use_systemd_python and environ is None else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout systemd set for this process (how often to ping), or ``None``."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None  # the watchdog is meant for another process of the service
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def notify(self, state: str) -> bool:
        """Send ``state`` (``KEY=value`` lines); returns whether it was sent."""
        if self.address is None:
            return False
        if self._native is not None:
            return bool(self._native(state))
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(1.0)
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError as exc:
            # The service manager going away must not take the service down with it.
            log.warning("sd_notify failed", extra={"socket": self.address, "error": str(exc)})
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the service is up (``READY=1``)."""
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")
