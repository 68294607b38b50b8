"""The discovery service: runs mDNS, SLP and the static list together, recognises devices
seen again, and tells the agent what it found and what to poll.

A source that cannot be opened on an interface (an address the host does not have yet, a port
another program holds) stops the one-shot scan, but not the agent: started with
``keep_going=True`` the service runs what it can (the static list, the other sources and
interfaces), lists what failed in :attr:`DiscoveryService.problems` and tries it again every
``retry_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from zeroconf import Error as ZeroconfError

from micboard.agent.discovery.found import Change, DiscoveryRegistry, FoundDevice, Sighting
from micboard.agent.discovery.mdns import DEFAULT_SERVICE_TYPES, MdnsBrowser
from micboard.agent.discovery.policy import AdoptionPolicy
from micboard.agent.discovery.slp import SLP_GROUP, SLP_PORT, SlpListener
from micboard.agent.discovery.static import StaticDevice
from micboard.shared.model import Family

logger = logging.getLogger(__name__)

DeviceCallback = Callable[[FoundDevice], Awaitable[None]]
"""An async callback that receives one device."""

ScanProgress = Callable[[int, float], None]
"""Called during :meth:`DiscoveryService.scan` with (devices found so far, fraction of the time done)."""

_Source = SlpListener | MdnsBrowser

#: What a source raises when the host refuses its sockets (an address it lacks, a port in use).
_OPEN_ERRORS = (OSError, ZeroconfError)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Which sources run, on which interfaces, and what is adopted.

    ``interfaces`` are the IPv4 addresses of the interfaces mDNS and SLP use. The default is
    loopback only, so that nothing is sent on a network by accident: a venue sets the
    address of its LAN interface.
    """

    interfaces: tuple[str, ...] = ("127.0.0.1",)
    mdns: bool = True
    slp: bool = True
    service_types: tuple[str, ...] = DEFAULT_SERVICE_TYPES
    extra_service_types: tuple[str, ...] = ()
    static: tuple[StaticDevice, ...] = ()
    policy: AdoptionPolicy = field(default_factory=AdoptionPolicy)
    slp_group: str = SLP_GROUP
    slp_port: int = SLP_PORT
    resolve_timeout_s: float = 3.0
    queue_size: int = 1024
    retry_interval_s: float = 60.0
    """How often a source that could not be opened on an interface is tried again (``keep_going``)."""


@dataclass(frozen=True, slots=True)
class DiscoveryProblem:
    """A discovery source that does not run on one interface address, and why."""

    source: str
    """``slp`` or ``mdns``."""
    interface: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} on {self.interface}: {self.reason}"


@dataclass(slots=True)
class DiscoveryStats:
    """Counters of the discovery service (bound: ``queue_size`` pending sightings; beyond, dropped)."""

    sightings: int = 0
    new: int = 0
    moved: int = 0
    changed: int = 0
    adopted: int = 0
    dropped: int = 0
    callback_errors: int = 0


async def _ignore(_device: FoundDevice) -> None:
    return None


class DiscoveryService:
    """Runs the configured discovery sources and hands their sightings to the agent.

    ``on_discovered`` is awaited for every new, moved or changed device (the agent publishes
    it as ``discovered``); ``on_adopt`` for a supported device the policy allows, when it is
    first seen and again when it moved or its family changed (the supervisor starts or
    re-targets its driver). Both run in one owned task, in order; an exception in either is
    logged and counted, and discovery goes on.
    """

    def __init__(
        self,
        config: DiscoveryConfig | None = None,
        *,
        on_discovered: DeviceCallback | None = None,
        on_adopt: DeviceCallback | None = None,
    ) -> None:
        self.config = config or DiscoveryConfig()
        self.registry = DiscoveryRegistry()
        self.stats = DiscoveryStats()
        self._on_discovered = on_discovered or _ignore
        self._on_adopt = on_adopt or _ignore
        self._queue: asyncio.Queue[FoundDevice] = asyncio.Queue(maxsize=self.config.queue_size)
        self._adopted: dict[str, tuple[str, int | None, Family | None]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self.mdns: MdnsBrowser | None = None
        self.slp: SlpListener | None = None
        # keep_going: the interfaces each source runs on, what failed, and sources being opened
        # or closed (closed by close() should it interrupt them).
        self._running_on: dict[str, tuple[str, ...]] = {}
        self._problems: dict[tuple[str, str], str] = {}
        self._loose: set[_Source] = set()

    @property
    def running(self) -> bool:
        """Whether the sources are running."""
        return self._worker is not None

    def devices(self) -> list[FoundDevice]:
        """Every device discovered so far."""
        return self.registry.devices()

    @property
    def problems(self) -> list[DiscoveryProblem]:
        """The sources that do not run on an interface (``keep_going`` only), and why; empty when all run."""
        return [
            DiscoveryProblem(source, interface, reason)
            for (source, interface), reason in sorted(self._problems.items())
        ]

    def sources_up(self) -> dict[tuple[str, str], bool]:
        """Whether each configured (source, interface) runs now."""
        return {
            (source, interface): interface in self._running_on.get(source, ())
            for source in self._sources()
            for interface in self.config.interfaces
        }

    def tasks(self) -> list[asyncio.Task[None]]:
        """The service's own running tasks (the worker, the retry of failed sources), for supervision."""
        return [t for t in (self._worker, self._retry) if t is not None and not t.done()]

    async def start(self, *, keep_going: bool = False) -> None:
        """Start every configured source.

        By default a socket that cannot be opened raises ``OSError`` (or zeroconf's error) and
        nothing is left running: what a one-shot scan wants. With ``keep_going`` each source is
        opened on the interfaces where it can be; what fails is logged as an error, listed in
        :attr:`problems` and tried again every ``retry_interval_s``, and the static list and the
        rest run meanwhile.
        """
        if self._worker is not None:
            return
        self._worker = asyncio.create_task(self._work(), name="discovery-worker")
        try:
            if keep_going:
                for source in self._sources():
                    await self._open_source(source)
            else:
                await self._open_strict()
        except BaseException:
            await self.close()
            raise
        self._feed_static()
        logger.info(
            "discovery started",
            extra={
                "mdns": self.config.mdns,
                "slp": self.config.slp,
                "static": len(self.config.static),
                **({"failing": "; ".join(map(str, self.problems))} if self._problems else {}),
            },
        )
        if self._problems:
            self._retry = asyncio.create_task(self._retry_forever(), name="discovery-retry")

    async def _open_strict(self) -> None:
        if self.config.slp:
            self.slp = SlpListener(
                self.report,
                interfaces=self.config.interfaces,
                group=self.config.slp_group,
                port=self.config.slp_port,
            )
            await self.slp.start()
            self._running_on["slp"] = self.config.interfaces
            self.slp.probe()
        if self.config.mdns:
            self.mdns = MdnsBrowser(
                self.report,
                interfaces=self.config.interfaces,
                service_types=(*self.config.service_types, *self.config.extra_service_types),
                resolve_timeout_s=self.config.resolve_timeout_s,
            )
            await self.mdns.start()
            self._running_on["mdns"] = self.config.interfaces

    # -- keep_going: open what can be opened, retry the rest ----------------------------------

    def _sources(self) -> tuple[str, ...]:
        return (*(("slp",) if self.config.slp else ()), *(("mdns",) if self.config.mdns else ()))

    def _new_source(self, source: str, interfaces: tuple[str, ...]) -> _Source:
        if source == "slp":
            return SlpListener(
                self.report, interfaces=interfaces, group=self.config.slp_group, port=self.config.slp_port
            )
        return MdnsBrowser(
            self.report,
            interfaces=interfaces,
            service_types=(*self.config.service_types, *self.config.extra_service_types),
            resolve_timeout_s=self.config.resolve_timeout_s,
        )

    async def _try_open(self, source: str, interfaces: tuple[str, ...]) -> tuple[_Source | None, str]:
        """The source started on ``interfaces``, or ``None`` and why the host refused it."""
        instance = self._new_source(source, interfaces)
        self._loose.add(instance)
        try:
            await instance.start()
        except _OPEN_ERRORS as exc:
            await self._close_source(instance)
            return None, str(exc) or type(exc).__name__
        return instance, ""

    async def _close_source(self, instance: _Source) -> None:
        self._loose.add(instance)
        await instance.close()
        self._loose.discard(instance)

    def _adopt_source(self, source: str, instance: _Source | None) -> _Source | None:
        """Make ``instance`` the running ``source`` (``None``: none runs); returns the one it replaces."""
        if instance is not None:
            self._loose.discard(instance)
        old: _Source | None
        if source == "slp":
            old, self.slp = self.slp, instance if isinstance(instance, SlpListener) else None
            if self.slp is not None:
                self.slp.probe()
        else:
            old, self.mdns = self.mdns, instance if isinstance(instance, MdnsBrowser) else None
        return old

    async def _open_source(self, source: str) -> None:
        """Run ``source`` on every configured interface it can be opened on; note the others."""
        wanted = self.config.interfaces
        running = self._running_on.get(source, ())
        if running == wanted:
            return
        failing: dict[str, str] = {}
        if not running:
            # The usual case: nothing wrong, all interfaces at once.
            instance, reason = await self._try_open(source, wanted)
            if instance is not None:
                self._adopt_source(source, instance)
                self._running_on[source] = wanted
                self._note(source, {})
                return
            if len(wanted) == 1:
                self._note(source, {wanted[0]: reason})
                return
        # Which of the interfaces it does not run on can be opened now? One at a time.
        usable = set(running)
        for interface in wanted:
            if interface in running:
                continue
            probe, reason = await self._try_open(source, (interface,))
            if probe is None:
                failing[interface] = reason
            else:
                await self._close_source(probe)
                usable.add(interface)
        if len(usable) > len(running):
            target = tuple(i for i in wanted if i in usable)
            old = self._adopt_source(source, None)
            self._running_on.pop(source, None)
            if old is not None:
                await self._close_source(old)
            instance, reason = await self._try_open(source, target)
            if instance is None:
                failing.update(dict.fromkeys(target, reason))
            else:
                self._adopt_source(source, instance)
                self._running_on[source] = target
        self._note(source, failing)

    def _note(self, source: str, failing: dict[str, str]) -> None:
        """Remember which interfaces ``source`` fails on; log what is new, and what recovered."""
        for interface in self.config.interfaces:
            key = (source, interface)
            before = self._problems.get(key)
            reason = failing.get(interface)
            if reason is None:
                if before is not None:
                    del self._problems[key]
                    logger.info("discovery running again", extra={"source": source, "interface": interface})
                continue
            self._problems[key] = reason
            if before != reason:
                logger.error(
                    "discovery cannot run on this interface, trying again later",
                    extra={
                        "source": source,
                        "interface": interface,
                        "error": reason,
                        "retry_in_s": self.config.retry_interval_s,
                    },
                )

    async def _retry_forever(self) -> None:
        while self._problems:
            await asyncio.sleep(self.config.retry_interval_s)
            for source in sorted({source for source, _ in self._problems}):
                await self._open_source(source)
        logger.info(
            "discovery runs on every interface", extra={"interfaces": ",".join(self.config.interfaces)}
        )

    def rediscover(self) -> None:
        """Forget what was seen and ask every source again, so every device is reported anew."""
        self.registry.clear()
        self._adopted.clear()
        self._feed_static()
        if self.slp is not None:
            self.slp.probe()
        if self.mdns is not None:
            self.mdns.refresh()

    async def wait_idle(self) -> None:
        """Wait until every sighting received so far has been handled."""
        await self._queue.join()

    async def scan(self, duration_s: float, progress: ScanProgress | None = None) -> list[FoundDevice]:
        """Listen for ``duration_s`` and return every device known at the end.

        Starts the sources for the scan (and stops them after) unless the service is running.
        ``progress`` is called about ten times a second with (devices so far, fraction done).
        """
        owned = not self.running
        if owned:
            await self.start()
        elif self.slp is not None:
            self.slp.probe()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            deadline = started + max(duration_s, 0.0)
            tick_s = 0.1
            while (now := loop.time()) < deadline:
                if progress is not None:
                    progress(len(self.registry), (now - started) / max(duration_s, 1e-9))
                await asyncio.sleep(min(tick_s, deadline - now))
            await self.wait_idle()
            if progress is not None:
                progress(len(self.registry), 1.0)
            return self.registry.devices()
        finally:
            if owned:
                await self.close()

    async def close(self) -> None:
        """Stop every source and the worker; pending sightings are dropped. Safe to call twice."""
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retry
        # Sources a cancelled retry was opening or closing.
        for loose in list(self._loose):
            await loose.close()
        self._loose.clear()
        self._running_on.clear()
        self._problems.clear()
        slp, self.slp = self.slp, None
        mdns, self.mdns = self.mdns, None
        if slp is not None:
            await slp.close()
        if mdns is not None:
            await mdns.close()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()

    def _feed_static(self) -> None:
        for entry in self.config.static:
            self.report(entry.to_found())

    def report(self, found: FoundDevice) -> None:
        """Queue one sighting from any source, such as a driver that learned a device's id.

        Call it in the event loop; it never blocks. Ignored while the service is not running.
        """
        if self._worker is None:
            return
        try:
            self._queue.put_nowait(found)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            logger.warning("discovery queue full, sighting dropped", extra={"address": found.address})

    async def _work(self) -> None:
        while True:
            found = await self._queue.get()
            try:
                await self._handle(found)
            finally:
                self._queue.task_done()

    async def _handle(self, found: FoundDevice) -> None:
        self.stats.sightings += 1
        sighting = self.registry.observe(found)
        if sighting.change is Change.UNCHANGED:
            return
        device = sighting.device
        self._count(sighting)
        logger.info(
            "device discovered",
            extra={
                "change": sighting.change.value,
                "source": device.source,
                "address": device.address,
                "port": device.port,
                "model": device.model,
                "family": device.family,
                "supported": device.supported,
            },
        )
        await self._call(self._on_discovered, device, "on_discovered")
        if not self.config.policy.adopts(device):
            return
        previous = sighting.previous
        if previous is not None and previous.identity != device.identity:
            # The registry re-keyed the device (its id became known): it is the same device.
            adopted = self._adopted.pop(previous.identity, None)
            if adopted is not None:
                self._adopted[device.identity] = adopted
        target = (device.address, device.port, device.family)
        if self._adopted.get(device.identity) == target:
            return
        self._adopted[device.identity] = target
        self.stats.adopted += 1
        await self._call(self._on_adopt, device, "on_adopt")

    def _count(self, sighting: Sighting) -> None:
        if sighting.change is Change.NEW:
            self.stats.new += 1
        elif sighting.change is Change.MOVED:
            self.stats.moved += 1
        else:
            self.stats.changed += 1

    async def _call(self, callback: DeviceCallback, device: FoundDevice, what: str) -> None:
        try:
            await callback(device)
        except Exception:  # a failing consumer must not stop discovery
            self.stats.callback_errors += 1
            logger.exception("discovery callback failed", extra={"callback": what, "address": device.address})
