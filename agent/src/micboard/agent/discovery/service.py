"""The discovery service: runs mDNS, SLP and the static list together, recognises devices
seen again, and tells the agent what it found and what to poll."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
        self.mdns: MdnsBrowser | None = None
        self.slp: SlpListener | None = None

    @property
    def running(self) -> bool:
        """Whether the sources are running."""
        return self._worker is not None

    def devices(self) -> list[FoundDevice]:
        """Every device discovered so far."""
        return self.registry.devices()

    async def start(self) -> None:
        """Start every configured source; raises ``OSError`` if a socket cannot be opened."""
        if self._worker is not None:
            return
        self._worker = asyncio.create_task(self._work(), name="discovery-worker")
        try:
            if self.config.slp:
                self.slp = SlpListener(
                    self.report,
                    interfaces=self.config.interfaces,
                    group=self.config.slp_group,
                    port=self.config.slp_port,
                )
                await self.slp.start()
                self.slp.probe()
            if self.config.mdns:
                self.mdns = MdnsBrowser(
                    self.report,
                    interfaces=self.config.interfaces,
                    service_types=(*self.config.service_types, *self.config.extra_service_types),
                    resolve_timeout_s=self.config.resolve_timeout_s,
                )
                await self.mdns.start()
        except BaseException:
            await self.close()
            raise
        self._feed_static()
        logger.info(
            "discovery started",
            extra={"mdns": self.config.mdns, "slp": self.config.slp, "static": len(self.config.static)},
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
