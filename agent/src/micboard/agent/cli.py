"""``micboard-agent``: run the venue agent, and the tools around it.

- ``run``: the agent daemon (discovery, drivers, state, publishing, commands) until SIGTERM;
- ``discover``: a one-shot scan that prints what answers on mDNS and SLP;
- ``check``: validates the configuration, that NATS and each static device answer, and that
  what ``run`` binds here (the metrics port, the discovery interfaces) can be bound;
- ``simulate``: a rack of simulated receivers, announced on the listen address.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import nats
from nats.errors import Error as NatsError

from micboard.agent.daemon import AgentDaemon, TaskCrashedError, driver_options
from micboard.agent.demo_source import demo_device
from micboard.agent.discovery import DiscoveryConfig, DiscoveryService, FoundDevice
from micboard.agent.discovery.dcid import default_port
from micboard.agent.drivers.base import DeviceTarget, split_reason
from micboard.agent.metrics import MetricsServer
from micboard.agent.natsauth import DEFAULT_NATS_URL, agent_connect_options
from micboard.agent.runner import AgentRunner
from micboard.agent.settings import AgentSettings, StaticDeviceSetting, load_agent_settings
from micboard.agent.simulate import SIMULATOR_KINDS, SimulatorRack, rack_kinds
from micboard.agent.startup import StartError
from micboard.agent.supervisor import default_driver
from micboard.shared import __version__
from micboard.shared.errors import MicboardError
from micboard.shared.logs import configure_logging
from micboard.shared.model import ChannelMeter, Device
from micboard.shared.settings import unknown_variables

log = logging.getLogger("micboard.agent")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_WorkItem = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DetachedExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor here: daemon worker threads, and a shutdown that never waits.

    asyncio runs blocking calls on the default executor, above all name look-ups
    (``loop.getaddrinfo``, which nats-py's connect goes through for a ``nats://host`` URL). A
    look-up hangs as long as the resolver does (a WAN that is down: tens of seconds), and
    ``asyncio.run`` ends by waiting for every thread of the default executor, so a SIGTERM
    that stopped the agent at once still kept the process alive until the resolver gave up.
    Here a pending call is cancelled at shutdown and one still running is left to its daemon
    thread, which dies with the process.

    Nothing that must finish runs here: the outbox has the sender's own executor, committed and
    closed (awaited) before the loop ends, and zeroconf its own thread. Work submitted here is
    what may be abandoned at exit: look-ups, and whatever a library hands to the default executor.

    A ``ThreadPoolExecutor`` only because ``loop.set_default_executor`` insists on one: none of
    its machinery is used (its threads are not daemons, and the interpreter joins them at exit).
    """

    _ids = itertools.count(1)

    def __init__(self, max_workers: int | None = None, *, name: str = "micboard-executor") -> None:
        # As ThreadPoolExecutor's default, but at most 8: the unit's TasksMax bounds threads too.
        self.max_workers = max_workers or min(8, (os.cpu_count() or 1) + 4)
        super().__init__(max_workers=self.max_workers, thread_name_prefix=name)
        self.name = name
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._closed = False

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Run ``fn(*args, **kwargs)`` on a worker thread; raises ``RuntimeError`` after shutdown."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: concurrent.futures.Future[_T] = concurrent.futures.Future()
            self._work.put((future, fn, args, kwargs))
            # An idle worker takes it; otherwise start one, up to the bound (then it waits its turn).
            if not self._idle.acquire(blocking=False) and len(self._workers) < self.max_workers:
                thread = threading.Thread(
                    target=self._worker, name=f"{self.name}-{next(self._ids)}", daemon=True
                )
                thread.start()
                self._workers.append(thread)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel what has not started and return at once, whatever ``wait`` says (see the class doc)."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            for _ in self._workers:
                self._work.put(None)  # each worker, once free, takes one and ends

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            self._idle.release()


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` with a :class:`DetachedExecutor` as the loop's default executor.

    So that a blocking call still running at the end (a name look-up the resolver holds) cannot
    hold the exit of the process after ``main`` returned.
    """
    with asyncio.Runner() as runner:
        runner.get_loop().set_default_executor(DetachedExecutor())
        return runner.run(main)


def _out(text: str = "", *, err: bool = False, end: str = "\n") -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text + end)
    stream.flush()


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type): ``-1`` or ``nan`` is a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the agent."""
    parser = argparse.ArgumentParser(prog="micboard-agent", description="micboard fleet venue agent")
    parser.add_argument("--version", action="version", version=f"micboard-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent until stopped (SIGTERM / Ctrl-C)")
    run.add_argument("--config", type=Path, help="TOML settings file (MICBOARD_* variables win)")
    run.add_argument(
        "--demo-device", action="store_true", help="report one fixed in-process receiver (no hardware needed)"
    )
    # Hidden: change the demo device this many times per second (fault tests of the outbox).
    run.add_argument("--demo-churn", type=float, default=0.0, help=argparse.SUPPRESS)

    discover = sub.add_parser("discover", help="scan once for receivers on mDNS and SLP and print them")
    discover.add_argument("--seconds", type=_seconds, default=5.0, help="how long to listen (default 5)")
    discover.add_argument(
        "--interface",
        action="append",
        metavar="ADDR",
        help="IPv4 address of an interface to scan on (repeatable; default 127.0.0.1)",
    )
    discover.add_argument("--no-mdns", action="store_true", help="do not browse DNS-SD")
    discover.add_argument("--no-slp", action="store_true", help="do not listen for Shure SLP")

    check = sub.add_parser(
        "check", help="validate the configuration, NATS, each static device and what run binds here"
    )
    check.add_argument("--config", type=Path, help="TOML settings file (MICBOARD_* variables win)")
    check.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds to wait for each answer (default 5)"
    )

    simulate = sub.add_parser("simulate", help="run a rack of simulated receivers until Ctrl-C")
    simulate.add_argument(
        "--device",
        action="append",
        metavar="KIND",
        required=True,
        help=f"a receiver to simulate (repeatable): {', '.join(SIMULATOR_KINDS)}",
    )
    simulate.add_argument("--listen", default="127.0.0.1", help="IPv4 address to listen and announce on")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the simulated behaviour")
    simulate.add_argument("--time-scale", type=float, default=1.0, help="speed of slow processes (battery)")
    simulate.add_argument("--activity", type=float, default=1.0, help="rate of random events (0 = none)")
    simulate.add_argument("--no-announce", action="store_true", help="do not announce on mDNS / SLP")
    simulate.add_argument("--no-slp", action="store_true", help="announce on mDNS only")
    simulate.add_argument(
        "--any-port", action="store_true", help="let every simulator take a free port instead of 2202 + n"
    )
    simulate.add_argument(
        "--port-base",
        type=int,
        metavar="PORT",
        help="simulator n (from 0, in --device order) listens on PORT + n, whatever its vendor",
    )
    return parser


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


# -- run -------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    settings = load_agent_settings(args.config)
    configure_logging(settings.log_level, settings.log_format)
    loop = asyncio.get_running_loop()
    service: AgentRunner | AgentDaemon
    if args.demo_device:
        service = AgentRunner(settings, [demo_device()], churn_per_s=args.demo_churn)
    else:
        service = AgentDaemon(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    try:
        await service.run()
    except StartError as exc:
        # One line naming the part and the reason: the journal shows it at a glance, and a
        # traceback would say nothing more about a port in use or a missing address.
        _out(f"micboard-agent run: cannot start: {exc}", err=True)
        return 1
    except TaskCrashedError as exc:
        # Logged with its traceback when it happened; a failure exit makes systemd restart us.
        _out(f"micboard-agent run: stopped: {exc}", err=True)
        return 1
    return 0


# -- discover --------------------------------------------------------------------------------


def _found_line(device: FoundDevice) -> str:
    where = f"{device.address}:{device.port}" if device.port is not None else device.address
    what = device.model or (device.family.value if device.family else "unknown model")
    supported = "supported" if device.supported else "not supported"
    name = f'  "{device.name}"' if device.name else ""
    ident = f"  id={device.device_id}" if device.device_id else ""
    return f"{device.source:<6} {where:<22} {what:<14} {supported}{ident}{name}"


async def _discover(args: argparse.Namespace) -> int:
    configure_logging("WARNING")
    interfaces = tuple(args.interface or ["127.0.0.1"])
    config = DiscoveryConfig(interfaces=interfaces, mdns=not args.no_mdns, slp=not args.no_slp)
    service = DiscoveryService(config)
    seconds = max(0.0, args.seconds)
    interactive = sys.stderr.isatty()
    last_shown = -1

    def progress(found: int, fraction: float) -> None:
        nonlocal last_shown
        percent = min(100, int(fraction * 100))
        line = f"scanning {', '.join(interfaces)}: {percent:3d}% ({found} found)"
        if interactive:
            _out("\r" + line, err=True, end="")
        elif percent // 25 != last_shown // 25 or (percent == 100 and last_shown != 100):
            _out(line, err=True)
        last_shown = percent

    try:
        devices = await service.scan(seconds, progress)
    except OSError as exc:
        _out(f"\nmicboard-agent discover: cannot listen on {', '.join(interfaces)}: {exc}", err=True)
        return 1
    if interactive:
        _out("", err=True)
    if not devices:
        _out(f"no devices found on {', '.join(interfaces)} in {seconds:g} s")
        return 0
    _out(f"found {len(devices)} device(s):")
    for device in devices:
        _out("  " + _found_line(device))
    return 0


# -- check -----------------------------------------------------------------------------------


class _ProbeListener:
    """Remembers the first full read or link failure of a probed device."""

    def __init__(self) -> None:
        self.device: Device | None = None
        self.failure: str | None = None
        self.done = asyncio.Event()

    def device_updated(self, device: Device) -> None:
        self.device = device
        self.done.set()

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        return None

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        if not online:
            self.failure = reason
            self.done.set()


async def probe_device(
    entry: StaticDeviceSetting, settings: AgentSettings, timeout_s: float
) -> tuple[bool, str]:
    """Read ``entry`` once with its real driver: (answered, what it said or why not)."""
    port = entry.port or default_port(entry.family)
    target = DeviceTarget(entry.address, port, entry.family, f"check-{entry.address}-{port}", entry.name)
    listener = _ProbeListener()
    driver = default_driver(target, listener, driver_options(settings))
    task = asyncio.create_task(driver.run(), name=f"check-{entry.address}")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.done.wait(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(driver.stop(), 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    device = listener.device
    if device is not None:
        model = device.model or device.family.value
        return (
            True,
            f"{model} id={device.device_id or device.serial or '?'}, {device.channel_count} channel(s)",
        )
    if listener.failure is not None:
        # A reason with what the driver saw ("connect_failed: ...") says it better than its code.
        code, said = split_reason(listener.failure)
        return False, said or f"no answer ({code.replace('_', ' ')})"
    return False, f"no answer within {timeout_s:g} s"


async def _quiet(_exc: Exception) -> None:
    """Connection errors are reported once by ``check`` itself, not logged by nats-py."""


def _bind_failure(exc: OSError) -> str:
    reason = str(exc) or type(exc).__name__
    if exc.errno == errno.EADDRINUSE:
        return f"{reason} (another process holds it: is the agent already running?)"
    return reason


async def _local_binds(settings: AgentSettings) -> list[tuple[bool, str]]:
    """Bind, and let go at once, what ``run`` binds on this host: (passed, what it says) of each.

    The metrics endpoint is opened with the server ``run`` uses; each discovery interface gets
    a UDP socket bound to its address, as SLP binds one, which fails on an address the host lacks.
    """
    results: list[tuple[bool, str]] = []
    if settings.metrics_port is not None:
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        server = MetricsServer(lambda: (), host=settings.metrics_host, port=settings.metrics_port)
        try:
            await server.start()
        except OSError as exc:
            results.append((False, f"metrics: cannot listen on {where}: {_bind_failure(exc)}"))
        else:
            results.append((True, f"metrics: {where} free to listen on"))
        finally:
            await server.close()
    if settings.discovery_mdns or settings.discovery_slp:
        for address in settings.interfaces:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((address, 0))
            except OSError as exc:
                reason = _bind_failure(exc)
                results.append((False, f"interface {address}: not usable for discovery: {reason}"))
            else:
                results.append((True, f"interface {address}: an address of this host"))
    return results


async def _check(args: argparse.Namespace) -> int:
    configure_logging("ERROR")
    try:
        settings = load_agent_settings(args.config)
    except MicboardError as exc:
        _out(f"FAIL config: {exc.message}")
        return 2
    source = str(args.config) if args.config else "environment"
    _out(f"ok   config: {source} (site {settings.site}, agent {settings.agent})")
    # Logged at warning level by the load, below this command's ERROR: said here, where a
    # misspelt variable is looked for. A warning, not a failure: another program may read it.
    for name, meant in unknown_variables(AgentSettings):
        _out(f"warn config: unknown setting {name} ignored" + (f"; did you mean {meant}?" if meant else ""))
    failures = 0
    url = settings.nats_url or DEFAULT_NATS_URL
    try:
        options = agent_connect_options(settings)
        # nats-py keeps retrying a refused first connect on its own: bound it here.
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[url],
                name="micboard-agent-check",
                connect_timeout=min(args.timeout, 5.0),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=_quiet,
                **options,
            ),
            args.timeout,
        )
    except MicboardError as exc:
        failures += 1
        _out(f"FAIL nats: {exc.message}")
    except (NatsError, OSError, TimeoutError) as exc:
        failures += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"no connection within {args.timeout:g} s"
        _out(f"FAIL nats: {url} not reachable ({reason})")
    else:
        try:
            await nc.flush(timeout=max(1, int(args.timeout)))
            _out(f"ok   nats: {url} reachable (server {nc.connected_server_version})")
        except (NatsError, TimeoutError) as exc:
            failures += 1
            _out(f"FAIL nats: {url} did not answer ({type(exc).__name__})")
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await nc.close()
    for ok, line in await _local_binds(settings):
        _out(f"{'ok  ' if ok else 'FAIL'} {line}")
        failures += 0 if ok else 1
    if not settings.static_devices:
        _out("ok   devices: no static devices configured (discovery finds the rest)")
    results = await asyncio.gather(
        *(probe_device(d, settings, args.timeout) for d in settings.static_devices)
    )
    for entry, (ok, detail) in zip(settings.static_devices, results, strict=True):
        where = f"{entry.address}:{entry.port or default_port(entry.family)}"
        _out(f"{'ok  ' if ok else 'FAIL'} device {entry.family.value} {where}: {detail}")
        failures += 0 if ok else 1
    _out("all checks passed" if failures == 0 else f"{failures} check(s) failed")
    return 0 if failures == 0 else 1


# -- simulate --------------------------------------------------------------------------------


async def _simulate(args: argparse.Namespace) -> int:
    configure_logging("WARNING")
    try:
        rack = SimulatorRack(
            rack_kinds(args.device),
            host=args.listen,
            seed=args.seed,
            time_scale=args.time_scale,
            activity=args.activity,
            announce=not args.no_announce,
            slp=not args.no_slp,
            fixed_ports=not args.any_port,
            port_base=args.port_base,
        )
    except ValueError as exc:
        _out(f"micboard-agent simulate: {exc}", err=True)
        return 2
    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        await rack.start()
    except OSError as exc:
        _out(f"micboard-agent simulate: cannot listen on {args.listen}: {exc}", err=True)
        return 1
    try:
        _out(f"simulating {len(rack.slots)} receiver(s) on {args.listen}:")
        for line in rack.describe():
            _out("  " + line)
        _out("Ctrl-C stops them.")
        await stop.wait()
    finally:
        await rack.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``micboard-agent``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    commands = {"run": _run, "discover": _discover, "check": _check, "simulate": _simulate}
    try:
        return run_async(commands[args.command](args))
    except MicboardError as exc:
        _out(f"micboard-agent: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
