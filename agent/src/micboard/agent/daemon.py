"""The agent daemon: discovery -> supervisor -> drivers -> state -> sender, plus heartbeats,
commands, metrics and systemd notifications.

It is what ``micboard-agent run`` runs unattended. Data flows one way: drivers report to the
supervisor, the state tracker turns reports into event bodies, and one publishing task wraps
them in envelopes (numbered in order) and hands them to the sender, which publishes to
JetStream or keeps them in the outbox while the link is down. Meters take a separate path on
core NATS and are dropped (and counted) while NATS is unreachable.

Shutdown (SIGTERM): discovery and the drivers stop first (no new state), the events already
made are handed to the sender, which flushes what is not acked into the outbox; the whole
sequence is bounded by ``shutdown_timeout_s`` so that the process exits within 5 s.

What the host refuses does not stop the agent once its outbox is open: discovery that cannot
bind on an interface is logged, shown in the status line and ``/metrics`` and tried again every
minute, while the static devices, the heartbeats and the outbox drain go on. A bug does stop
it: when an essential background task (the sender's loops, the publishing, meter, heartbeat,
command-subscription and watchdog tasks, the snapshot ticker, discovery's worker) ends with an
exception, the watchdog is no longer pinged and :meth:`AgentDaemon.run` closes cleanly and
raises :class:`TaskCrashedError`; ``micboard-agent run`` exits non-zero and systemd restarts it
(the outbox keeps the events).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from pydantic import BaseModel

from micboard.agent.discovery import (
    AdoptionPolicy,
    DiscoveryConfig,
    DiscoveryService,
    FoundDevice,
    StaticDevice,
)
from micboard.agent.discovery.mdns import DEFAULT_SERVICE_TYPES
from micboard.agent.drivers.base import DriverCommand, DriverOptions
from micboard.agent.metrics import Metric, MetricsServer
from micboard.agent.natsauth import DEFAULT_NATS_URL, command_allowed
from micboard.agent.publisher import EnvelopeFactory, round_trip
from micboard.agent.runner import build_sender
from micboard.agent.sender import EventSender
from micboard.agent.settings import AgentSettings
from micboard.agent.startup import starting
from micboard.agent.state import DeviceState, StateTracker
from micboard.agent.supervisor import DeviceSupervisor
from micboard.shared import __version__
from micboard.shared.codec import decode, encode
from micboard.shared.envelope import (
    AnyEvent,
    CommandAction,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    HeartbeatBody,
    HelloBody,
    MeterBody,
)
from micboard.shared.errors import WireError
from micboard.shared.sdnotify import SystemdNotifier
from micboard.shared.subjects import Kind, build_subject

log = logging.getLogger(__name__)

# Bounds of the in-memory hand-over queues. State events normally spend microseconds here
# (the sender writes to the outbox when the link is down); the bound only matters if the
# sender itself stalls, and every event dropped here is counted.
_STATE_QUEUE = 10_000
_METER_QUEUE = 1_024
_MAX_COMMANDS_IN_FLIGHT = 32


class EventSink(Protocol):
    """What the daemon needs from a sender: start, a send that never raises for link problems, close."""

    @property
    def nc(self) -> Client | None:
        """The NATS connection once established (commands are subscribed on it)."""

    async def start(self) -> None:
        """Open the outbox and start connecting."""

    async def send(self, event: AnyEvent) -> object:
        """Publish ``event`` or keep it for later; never raises for link problems."""

    async def close(self, timeout_s: float = 5.0) -> None:
        """Keep what is not acked in the outbox and close, within ``timeout_s``."""

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its running loops, which the daemon watches: one that crashes stops the agent."""


class TaskCrashedError(RuntimeError):
    """An essential task of the agent ended with an exception: the agent stops, systemd restarts it."""

    def __init__(self, task: str, error: BaseException) -> None:
        super().__init__(f"essential task {task} crashed: {type(error).__name__}: {error}".rstrip(": "))
        self.task = task
        self.error = error


@dataclass(slots=True)
class DaemonStats:
    """Counters of the daemon itself (the sender, tracker and drivers keep their own)."""

    events: dict[str, int] = field(default_factory=dict)
    queue_dropped: int = 0
    send_errors: int = 0
    meters_dropped: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    commands_refused: int = 0
    last_error: str | None = None


def driver_options(settings: AgentSettings) -> DriverOptions:
    """The drivers' timings from the settings."""
    return DriverOptions(
        meter_interval_ms=settings.meter_interval_ms,
        silence_timeout_s=settings.silence_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        command_timeout_s=settings.driver_command_timeout_s,
        backoff_initial_s=settings.reconnect_backoff_initial_s,
        backoff_max_s=settings.reconnect_backoff_max_s,
        poll_interval_s=settings.poll_interval_s,
    )


def discovery_config(settings: AgentSettings) -> DiscoveryConfig:
    """The discovery sources, interfaces, static list and adoption policy from the settings."""
    return DiscoveryConfig(
        interfaces=tuple(settings.interfaces),
        mdns=settings.discovery_mdns,
        slp=settings.discovery_slp,
        service_types=tuple(settings.mdns_service_types or DEFAULT_SERVICE_TYPES),
        extra_service_types=tuple(settings.extra_service_types),
        static=tuple(
            StaticDevice(address=d.address, family=d.family, port=d.port, name=d.name)
            for d in settings.static_devices
        ),
        policy=AdoptionPolicy.from_cidrs(settings.allow_cidrs, settings.deny_cidrs),
    )


class AgentDaemon:
    """The venue agent: owns every task it starts and cancels them all on :meth:`close`.

    By default events go through an :class:`~micboard.agent.sender.EventSender` with its outbox
    in ``state_dir``; ``sender`` replaces it (tests).
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        sender: EventSink | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.factory = EnvelopeFactory(settings.site, settings.agent)
        self.stats = DaemonStats()
        self.notifier = notifier or SystemdNotifier()
        self.sender: EventSink = sender or self._build_sender()
        self.tracker = StateTracker(
            self._enqueue,
            self._enqueue_meter,
            snapshot_interval_s=settings.snapshot_interval_s,
            meter_rate_hz=settings.meter_rate_hz,
        )
        self.supervisor = DeviceSupervisor(
            self.tracker,
            driver_options(settings),
            stop_timeout_s=min(2.0, settings.shutdown_timeout_s / 2),
            state_dir=settings.state_dir,
        )
        self.discovery = DiscoveryService(
            discovery_config(settings), on_discovered=self._on_discovered, on_adopt=self._on_adopt
        )
        self.metrics: MetricsServer | None = None
        self.started_at = time.monotonic()
        self._queue: asyncio.Queue[BaseModel] = asyncio.Queue(maxsize=_STATE_QUEUE)
        self._meters: asyncio.Queue[MeterBody] = asyncio.Queue(maxsize=_METER_QUEUE)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Essential tasks (ours and those the sender, tracker and discovery start), by name.
        self._essential: list[tuple[str, asyncio.Task[Any]]] = []
        self._failure: TaskCrashedError | None = None
        self._failed_task: asyncio.Task[Any] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._cmd_sub: Subscription | None = None
        self._stop = asyncio.Event()
        self._started = False
        self._closed = False
        self._subscribed = asyncio.Event()

    # -- composition --------------------------------------------------------------------

    @property
    def cmd_subject(self) -> str:
        """The subject commands for this agent arrive on."""
        return build_subject(self.settings.site, self.settings.agent, Kind.CMD)

    @property
    def nc(self) -> Client | None:
        """The sender's NATS connection, once established."""
        return self.sender.nc

    def _build_sender(self) -> EventSink:
        return build_sender(self.settings)

    async def start(self) -> None:
        """Start everything; returns once discovery runs (NATS may still be connecting).

        Raises :class:`~micboard.agent.startup.StartError` naming the part the host refused (the
        outbox, the metrics endpoint, discovery on the interfaces); what started is closed again.
        """
        if self._started:
            return
        self._started = True
        self.started_at = time.monotonic()
        self.notifier.status("starting")
        try:
            with starting(f"outbox in {self.settings.state_dir}"):
                await self.sender.start()
            for task in self.sender.tasks():
                self._watch(f"sender:{task.get_name()}", task)
            self._spawn("commands", self._subscribe_commands())
            self._spawn("publish", self._publish_forever())
            self._spawn("meters", self._meters_forever())
            self._enqueue(
                HelloBody(
                    version=__version__,
                    hostname=socket.gethostname(),
                    config={
                        "static_devices": len(self.settings.static_devices),
                        "mdns": self.settings.discovery_mdns,
                        "slp": self.settings.discovery_slp,
                        "interfaces": ",".join(self.settings.interfaces),
                        "snapshot_interval_s": self.settings.snapshot_interval_s,
                        "meter_rate_hz": self.settings.meter_rate_hz,
                    },
                )
            )
            self.tracker.start()
            for task in self.tracker.tasks():
                self._watch(f"tracker:{task.get_name()}", task)
            self._spawn("heartbeat", self._heartbeat_forever())
            if self.settings.metrics_port is not None:
                self.metrics = MetricsServer(
                    self.collect_metrics, host=self.settings.metrics_host, port=self.settings.metrics_port
                )
                with starting(f"metrics endpoint {self.settings.metrics_host}:{self.settings.metrics_port}"):
                    await self.metrics.start()
            # An interface that cannot be bound is logged and retried, not a reason to stop.
            await self.discovery.start(keep_going=True)
            for task in self.discovery.tasks():
                self._watch(f"discovery:{task.get_name()}", task)
            watchdog_s = self.notifier.watchdog_interval_s()
            if watchdog_s is not None:
                self._spawn("watchdog", self._watchdog_forever(watchdog_s))
        except BaseException:
            await self.close()
            raise
        self.notifier.ready(status=self._status_line())
        log.info(
            "agent started",
            extra={
                "site": self.settings.site,
                "agent": self.settings.agent,
                "boot": self.factory.boot,
                "nats": self.settings.nats_url or DEFAULT_NATS_URL,
            },
        )

    async def run(self) -> None:
        """Start, run until :meth:`stop` (or an essential task crashes), then close.

        Raises :class:`~micboard.agent.startup.StartError` when a part cannot start, and
        :class:`TaskCrashedError` (after closing) when an essential task ended with an exception.
        """
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.close()
        if self._failure is not None:
            raise self._failure

    @property
    def failure(self) -> TaskCrashedError | None:
        """The crash of an essential task that stopped (or is stopping) the agent, if any."""
        return self._failure

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler)."""
        self._stop.set()

    async def close(self) -> None:
        """Stop polling, hand every made event to the sender, close it and the link; bounded in time."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.notifier.stopping(status="stopping")
        budget = self.settings.shutdown_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        await self.discovery.close()
        await self.supervisor.close()
        await self.tracker.close()
        for name in ("heartbeat", "watchdog", "commands"):
            await self._cancel(name)
        sub, self._cmd_sub = self._cmd_sub, None
        if sub is not None:
            with contextlib.suppress(NatsError, TimeoutError, OSError):
                async with asyncio.timeout(0.5):
                    await sub.unsubscribe()
        await self._cancel_commands()
        # What the drivers reported last is in the queue: let the publishing task hand it over.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, (deadline - loop.time()) / 3)):
                await self._queue.join()
        for name in ("publish", "meters"):
            await self._cancel(name)
        self.stats.queue_dropped += self._queue.qsize()
        try:
            # The sender commits what is not acked to the outbox and closes the link in its budget.
            await self.sender.close(timeout_s=max(0.5, deadline - loop.time()))
        except Exception:  # the process is going away anyway; say so and go on
            log.exception("sender close failed")
        if self.metrics is not None:
            await self.metrics.close()
        failed = {} if self._failure is None else {"failed": self._failure.task}
        log.info("agent stopped", extra={"events": sum(self.stats.events.values()), **failed})

    # -- essential tasks ----------------------------------------------------------------

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"agent-{name}")
        self._tasks[name] = task
        self._watch(name, task)

    def _watch(self, name: str, task: asyncio.Task[Any]) -> None:
        """Stop the agent when ``task`` ends with an exception (ending or being cancelled is fine)."""
        self._essential.append((name, task))
        task.add_done_callback(functools.partial(self._essential_done, name))

    def _essential_done(self, name: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or (error := task.exception()) is None or task is self._failed_task:
            return
        if self._closed or self._failure is not None:
            # Stopping anyway (or already for another crash): said, but no new verdict.
            log.error("agent task failed", exc_info=error, extra={"task": name})
            return
        self._failure, self._failed_task = TaskCrashedError(name, error), task
        log.critical(
            "essential agent task crashed, stopping the agent (systemd restarts it)",
            exc_info=error,
            extra={"task": name},
        )
        self._stop.set()
        with contextlib.suppress(Exception):  # telling systemd is a courtesy; stopping is what counts
            self.notifier.status(f"stopping: {self._failure}"[:500])

    def _healthy(self) -> bool:
        """No essential task has crashed: checked here too, not only by the done callbacks to come."""
        if self._failure is None:
            for name, task in self._essential:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self._essential_done(name, task)
                    break
        return self._failure is None

    async def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            # Never raises: a task that crashed was reported by its done callback.
            await asyncio.wait([task])

    async def _cancel_commands(self) -> None:
        commands = list(self._commands)
        for task in commands:
            task.cancel()
        await asyncio.gather(*commands, return_exceptions=True)

    # -- NATS link ----------------------------------------------------------------------

    async def _subscribe_commands(self) -> None:
        # The sender connects in the background (NATS may be down at boot); subscribe once it has.
        # nats-py re-subscribes by itself after a reconnect.
        while True:
            while (nc := self.sender.nc) is None:  # noqa: ASYNC110 - the sender offers no event to wait on
                await asyncio.sleep(0.1)
            try:
                self._cmd_sub = await nc.subscribe(self.cmd_subject, cb=self._on_command_msg)
                break
            except (NatsError, OSError) as exc:  # a link going down right now: not a crash, try again
                log.warning("commands not subscribed yet", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(1.0)
        # nats-py writes a flush's PING straight to the socket, ahead of a SUB still queued for
        # its flusher task (seen in the server's trace: a command sent once this returned found
        # no responder). The first round trip gets the SUB written; the second proves the server
        # has it, so that "subscribed" means a command sent now reaches us.
        while True:
            try:
                for _ in range(2):
                    await round_trip(nc, self.settings.publish_timeout_s)
                break
            except NatsError as exc:  # a slow or lost link: the SUB stands, ask again
                log.warning("commands subscription not confirmed yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
        self._subscribed.set()
        log.info("commands subscribed", extra={"subject": self.cmd_subject})

    async def wait_subscribed(self) -> None:
        """Wait until the NATS link is up and commands are subscribed."""
        await self._subscribed.wait()

    # -- events -------------------------------------------------------------------------

    def _enqueue(self, body: BaseModel) -> None:
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self.stats.queue_dropped += 1
            log.warning("event queue full, event dropped", extra={"body": type(body).__name__})

    def _enqueue_meter(self, body: MeterBody) -> None:
        if self._meters.full():
            # Latest wins: the oldest levels are the least useful ones.
            self._meters.get_nowait()
            self._meters.task_done()
            self.stats.meters_dropped += 1
        self._meters.put_nowait(body)

    async def _publish_forever(self) -> None:
        while True:
            body = await self._queue.get()
            try:
                # The envelope is made here, in queue order, so that seq follows event order.
                event = self.factory.make(body)
                await self.sender.send(event)
                self.stats.events[event.kind] = self.stats.events.get(event.kind, 0) + 1
            except Exception as exc:  # the sender promises not to raise; if it does, count and go on
                self.stats.send_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("sending an event failed")
            finally:
                self._queue.task_done()

    async def _meters_forever(self) -> None:
        while True:
            body = await self._meters.get()
            try:
                await self.sender.send(self.factory.make(body))
            except Exception as exc:  # noqa: BLE001 - the sender promises not to raise; count and go on
                self.stats.meters_dropped += 1
                log.debug("meter not sent", extra={"error": str(exc)})
            finally:
                self._meters.task_done()

    async def _on_discovered(self, found: FoundDevice) -> None:
        self._enqueue(found.to_body())

    async def _on_adopt(self, found: FoundDevice) -> None:
        await self.supervisor.adopt(found)

    # -- heartbeat, watchdog ------------------------------------------------------------

    def _outbox(self) -> tuple[int, int, int, str | None]:
        """Outbox depth, bytes, dropped events and the last publish error, from the sender."""
        sender = self.sender
        if isinstance(sender, EventSender):
            stats = sender.stats
            error = stats.last_publish_error or self.stats.last_error
            return stats.outbox_depth, stats.outbox_bytes, stats.dropped + self.stats.queue_dropped, error
        return 0, 0, self.stats.queue_dropped, self.stats.last_error

    def heartbeat(self) -> HeartbeatBody:
        """The heartbeat body as of now."""
        depth, size, dropped, error = self._outbox()
        return HeartbeatBody(
            interval_s=float(self.settings.heartbeat_interval_s),
            uptime_s=round(time.monotonic() - self.started_at, 3),
            version=__version__,
            devices_by_state=self.tracker.devices_by_state(),
            outbox_depth=depth,
            outbox_bytes=size,
            dropped=dropped,
            last_publish_error=None if error is None else error[:500],
        )

    async def _heartbeat_forever(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            self._enqueue(self.heartbeat())
            self.notifier.status(self._status_line())
            await asyncio.sleep(interval)

    async def _watchdog_forever(self, interval_s: float) -> None:
        # Pinged from the event loop: a loop that hangs stops the pings and systemd restarts us.
        # So does an essential task that crashed: from then on, no ping.
        while self._healthy():
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    def _status_line(self) -> str:
        states = self.tracker.devices_by_state()
        link = "connected" if self.nc is not None and self.nc.is_connected else "nats unreachable"
        line = f"{states.get('online', 0)} online, {states.get('offline', 0)} offline; {link}"
        problems = self.discovery.problems
        if problems:
            line += "; discovery failing: " + ", ".join(f"{p.source} on {p.interface}" for p in problems)
        return line

    # -- commands -----------------------------------------------------------------------

    async def _on_command_msg(self, msg: Msg) -> None:
        # Each command runs in its own task so that a slow device does not hold up the others.
        if len(self._commands) >= _MAX_COMMANDS_IN_FLIGHT:
            busy = CommandResult(
                request_id=_request_id(msg.data),
                outcome=CommandOutcome.FAILED,
                detail="agent busy: too many commands in flight",
            )
            await self._reply(msg, busy)
            return
        task = asyncio.create_task(self._command(msg), name="agent-command")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(self, msg: Msg) -> None:
        try:
            async with asyncio.timeout(self.settings.command_timeout_s):
                result = await self.handle_command(msg.data, subject=msg.subject)
        except TimeoutError:
            result = CommandResult(
                request_id=_request_id(msg.data),
                outcome=CommandOutcome.FAILED,
                detail=f"no result within {self.settings.command_timeout_s:g} s",
            )
        except Exception as exc:  # one command's bug: answered and logged, the agent goes on
            log.exception("command failed", extra={"request_id": _request_id(msg.data)})
            result = CommandResult(
                request_id=_request_id(msg.data),
                outcome=CommandOutcome.FAILED,
                detail=f"agent error: {type(exc).__name__}: {exc}"[:500],
            )
        self.stats.commands[result.outcome.value] = self.stats.commands.get(result.outcome.value, 0) + 1
        await self._reply(msg, result)

    async def _reply(self, msg: Msg, result: CommandResult) -> None:
        if not msg.reply:
            log.info("command without reply subject", extra={"outcome": result.outcome.value})
            return
        with contextlib.suppress(NatsError, OSError):
            await msg.respond(encode(result))

    async def handle_command(self, data: bytes, subject: str | None = None) -> CommandResult:
        """Decode, validate and carry out one command; always returns a typed result.

        ``subject`` is the subject the command arrived on, when it came over NATS: a command must
        arrive on this agent's own ``cmd`` subject, whatever its envelope says.
        """
        request_id = _request_id(data)
        try:
            event = decode(data, max_bytes=self.settings.max_message_bytes)
        except WireError as exc:
            log.warning("invalid command", extra={"error": str(exc)})
            return CommandResult(request_id=request_id, outcome=CommandOutcome.INVALID, detail=str(exc)[:500])
        if not isinstance(event, CommandEvent):
            return CommandResult(
                request_id=request_id,
                outcome=CommandOutcome.INVALID,
                detail=f"expected a cmd, got {event.kind}",
            )
        body = event.body
        if not command_allowed(event, self.settings.site, self.settings.agent, subject=subject):
            self.stats.commands_refused += 1
            log.warning(
                "command for another agent refused",
                extra={"site": event.site, "agent": event.agent, "request_id": body.request_id},
            )
            mine = (event.site, event.agent) == (self.settings.site, self.settings.agent)
            return CommandResult(
                request_id=body.request_id,
                outcome=CommandOutcome.INVALID,
                detail=(
                    f"arrived on {subject}, not on this agent's command subject"
                    if mine
                    else f"addressed to {event.site}/{event.agent}, not to this agent"
                ),
            )
        log.info(
            "command",
            extra={"request_id": body.request_id, "action": body.action.value, "device_key": body.device_key},
        )
        if body.action is CommandAction.REDISCOVER:
            self.discovery.rediscover()
            return CommandResult(request_id=body.request_id, outcome=CommandOutcome.OK)
        if body.device_key is None:
            return CommandResult(
                request_id=body.request_id,
                outcome=CommandOutcome.INVALID,
                detail=f"{body.action} needs a device_key",
            )
        driver = self.supervisor.driver(body.device_key)
        if driver is None:
            return CommandResult(
                request_id=body.request_id,
                outcome=CommandOutcome.DEVICE_OFFLINE,
                detail=f"no device {body.device_key!r} on this agent",
            )
        if not driver.online:
            return CommandResult(
                request_id=body.request_id,
                outcome=CommandOutcome.DEVICE_OFFLINE,
                detail="device is not answering",
            )
        try:
            reply = await driver.execute(
                DriverCommand(action=body.action, channel=body.channel, value=body.value)
            )
        except Exception as exc:  # a driver bug becomes a FAILED reply, not a silent timeout
            log.exception("command failed in driver", extra={"device_key": body.device_key})
            return CommandResult(
                request_id=body.request_id, outcome=CommandOutcome.FAILED, detail=str(exc)[:500]
            )
        detail = None if reply.detail is None else reply.detail[:500]
        return CommandResult(request_id=body.request_id, outcome=reply.outcome, detail=detail)

    # -- metrics ------------------------------------------------------------------------

    def collect_metrics(self) -> Iterable[Metric]:
        """The agent's metrics for the Prometheus endpoint."""
        devices = Metric("micboard_agent_devices", "Supervised devices by state.", "gauge")
        for state, count in self.tracker.devices_by_state().items():
            devices.add(count, state=state)
        events = Metric("micboard_agent_events_total", "Events handed to the sender, by kind.", "counter")
        for kind, count in sorted(self.stats.events.items()):
            events.add(count, kind=kind)
        commands = Metric("micboard_agent_commands_total", "Commands answered, by outcome.", "counter")
        for outcome, count in sorted(self.stats.commands.items()):
            commands.add(count, outcome=outcome)
        depth, size, _dropped, _error = self._outbox()
        drivers = self.supervisor.driver_stats()
        sender = self.sender
        acked = meters = meters_dropped = nats_reconnects = outbox_errors = 0
        connected = False
        if isinstance(sender, EventSender):
            stats = sender.stats
            acked, meters, outbox_errors = stats.acked, stats.meters_published, stats.outbox_errors
            meters_dropped, nats_reconnects, connected = (
                stats.dropped_meter,
                stats.reconnects,
                stats.connected,
            )
        meters_dropped += self.stats.meters_dropped + self.tracker.stats.meters_superseded
        # Every drop of a state event by its reason: the outbox bounds, refusals, shutdown, disk.
        drops = Metric("micboard_agent_dropped_total", "State events dropped, by reason.", "counter")
        by_reason = {"queue": self.stats.queue_dropped}
        if isinstance(sender, EventSender):
            s = sender.stats
            by_reason |= {
                "full": s.dropped_full,
                "age": s.dropped_age,
                "rejected": s.dropped_rejected,
                "closed": s.dropped_closed,
                "io": s.dropped_io,
            }
        for reason, count in sorted(by_reason.items()):
            drops.add(count, reason=reason)
        discovery = Metric(
            "micboard_agent_discovery_up",
            "1 when the discovery source runs on the interface, 0 when it could not bind (retried).",
            "gauge",
        )
        for (source, interface), up in sorted(self.discovery.sources_up().items()):
            discovery.add(int(up), source=source, interface=interface)

        def single(name: str, help_text: str, kind: str, value: float) -> Metric:
            return Metric(name, help_text, kind).add(value)

        return [
            single("micboard_agent_uptime_seconds", "Seconds since the agent started.", "gauge",
                   round(time.monotonic() - self.started_at, 3)),
            devices,
            events,
            single("micboard_agent_published_total", "Events acked by JetStream.", "counter", acked),
            single("micboard_agent_meters_published_total", "Meter messages published.", "counter", meters),
            single("micboard_agent_meters_dropped_total", "Meter levels dropped (throttled or link down).",
                   "counter", meters_dropped),
            single("micboard_agent_outbox_depth", "Events waiting in the outbox.", "gauge", depth),
            single("micboard_agent_outbox_bytes", "Bytes waiting in the outbox.", "gauge", size),
            drops,
            single("micboard_agent_outbox_errors_total", "Outbox reads and writes that failed (retried).",
                   "counter", outbox_errors),
            single("micboard_agent_nats_connected", "1 when the NATS link is up.", "gauge", int(connected)),
            single("micboard_agent_nats_reconnects_total", "NATS reconnects.", "counter", nats_reconnects),
            single("micboard_agent_driver_reconnects_total", "Driver reconnects to devices.", "counter",
                   drivers.get("reconnects", 0)),
            single("micboard_agent_driver_parse_errors_total", "Device messages that did not parse.",
                   "counter", drivers.get("parse_errors", 0)),
            single("micboard_agent_driver_crashes_total", "Driver tasks that crashed and were restarted.",
                   "counter", self.supervisor.stats.crashes),
            commands,
            discovery,
        ]  # fmt: skip

    # -- for tests and the CLI ----------------------------------------------------------

    def device_state(self, device_key: str) -> DeviceState | None:
        """The state of a supervised device."""
        return self.tracker.state(device_key)


def _request_id(data: bytes) -> str:
    """The ``request_id`` of a command that may not decode, so that even a refusal can be matched."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError):
        return "unknown"
    body = obj.get("body") if isinstance(obj, dict) else None
    value = body.get("request_id") if isinstance(body, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else "unknown"
