"""One supervised driver task per adopted receiver.

The supervisor picks the driver by family (Shure command strings or Sennheiser SSC), starts it
when discovery or the static list adopts a device, restarts it with capped, jittered backoff
when its task crashes (logged and counted), re-targets it when the same device shows up at a
new address, and stops every driver cleanly on close. It is the drivers'
:class:`~micboard.agent.drivers.base.DeviceListener` and hands what they report on.

A device found without an id (an SSC receiver's DNS-SD announcement carries none) is known by
its address until its driver reads its serial. If that serial belongs to a device already
supervised whose link is down, the device moved (DHCP): the known device is re-targeted to the
new address and the new entry dropped before anything of it was reported, so the fleet sees
one receiver, not a second one. While the known device's link is still up (its dead-link
timeout not over yet), the new entry's reports wait; two devices answering at once under one
id are two devices, and both are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from micboard.agent.discovery.dcid import default_port, vendor_for_family
from micboard.agent.discovery.found import FoundDevice
from micboard.agent.drivers.base import DeviceListener, DeviceTarget, DriverOptions, ReceiverDriver
from micboard.agent.drivers.sennheiser import SscDriver
from micboard.agent.drivers.shure import ShureDriver
from micboard.shared.model import ChannelMeter, Device, Vendor

log = logging.getLogger(__name__)


class SupervisedListener(DeviceListener, Protocol):
    """A :class:`DeviceListener` that is also told when a device's driver (re)starts or goes away."""

    def track(self, device_key: str) -> None:
        """A driver for ``device_key`` (re)starts: its next state is a full snapshot."""

    def forget(self, device_key: str) -> None:
        """``device_key`` is no longer supervised."""


DriverFactory = Callable[[DeviceTarget, DeviceListener, DriverOptions], ReceiverDriver]
"""Builds the driver of one target (the default chooses by family)."""

# A driver that ran this long before crashing is healthy again: its backoff starts over.
_HEALTHY_RUN_S = 60.0
_KEY_CHARS = re.compile(r"[^a-z0-9_.-]+")


def default_driver(target: DeviceTarget, listener: DeviceListener, options: DriverOptions) -> ReceiverDriver:
    """The driver of ``target``'s family: Shure families -> ShureDriver, EW-DX / D6000 -> SscDriver."""
    if vendor_for_family(target.family) is Vendor.SENNHEISER:
        return SscDriver(target, listener, options)
    return ShureDriver(target, listener, options)


def _add_stats(totals: dict[str, int], driver: ReceiverDriver) -> None:
    for name in type(driver.stats).__dataclass_fields__:
        totals[name] = totals.get(name, 0) + int(getattr(driver.stats, name))


def device_key_for(found: FoundDevice) -> str:
    """A stable key for a found device: vendor and id when known, else family, address and port."""
    if found.device_id:
        vendor = found.vendor.value if found.vendor is not None else "device"
        raw = f"{vendor}-{found.device_id}"
    else:
        family = found.family.value if found.family is not None else "device"
        raw = f"{family}-{found.address}-{found.port if found.port is not None else 'default'}"
    return _KEY_CHARS.sub("-", raw.lower()).strip("-")[:128] or "device"


@dataclass(slots=True)
class SupervisorStats:
    """Counters of the supervisor."""

    adopted: int = 0
    moved: int = 0
    crashes: int = 0
    restarts: int = 0
    removed: int = 0


@dataclass(slots=True)
class Supervised:
    """One supervised device: its target, its current driver and its task."""

    key: str
    target: DeviceTarget
    identities: set[str] = field(default_factory=set)
    driver: ReceiverDriver | None = None
    task: asyncio.Task[None] | None = None
    crashes: int = 0
    last_error: str | None = None
    online: bool = False
    link_down: asyncio.Event = field(default_factory=asyncio.Event)
    # The latest state of a device being told apart from a known one with its id (see module doc).
    held: Device | None = None
    holding: asyncio.Task[None] | None = None
    distinct: bool = False


class DeviceSupervisor:
    """Runs one driver task per adopted device and forwards what drivers report to ``listener``."""

    def __init__(
        self,
        listener: SupervisedListener,
        options: DriverOptions | None = None,
        *,
        driver_factory: DriverFactory = default_driver,
        restart_initial_s: float = 1.0,
        restart_max_s: float = 30.0,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.listener = listener
        self.options = options or DriverOptions()
        self._factory = driver_factory
        self.restart_initial_s = restart_initial_s
        self.restart_max_s = restart_max_s
        self.stop_timeout_s = stop_timeout_s
        self.stats = SupervisorStats()
        self._devices: dict[str, Supervised] = {}
        self._by_identity: dict[str, str] = {}
        # Counters of the drivers that are gone, so that the exported sums never decrease.
        self._retired: dict[str, int] = {}
        self._closed = False
        self._lock = asyncio.Lock()

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._devices)

    def keys(self) -> list[str]:
        """The keys of every supervised device."""
        return sorted(self._devices)

    def get(self, device_key: str) -> Supervised | None:
        """The supervised device ``device_key``, or ``None``."""
        return self._devices.get(device_key)

    def driver(self, device_key: str) -> ReceiverDriver | None:
        """The current driver of ``device_key``, or ``None`` when it is not supervised."""
        supervised = self._devices.get(device_key)
        return None if supervised is None else supervised.driver

    def driver_stats(self) -> dict[str, int]:
        """The drivers' counters summed over every driver this supervisor ran (parse errors, reconnects, ...).

        Drivers replaced (a crash restart, a device that moved) or removed still count: the sums
        are exported as Prometheus counters, which must never go down.
        """
        totals = dict(self._retired)
        for supervised in self._devices.values():
            if supervised.driver is not None:
                _add_stats(totals, supervised.driver)
        return totals

    def _retire(self, supervised: Supervised) -> None:
        """Fold the counters of ``supervised``'s driver into the running totals and let it go."""
        driver, supervised.driver = supervised.driver, None
        if driver is not None:
            _add_stats(self._retired, driver)

    # -- adopting -----------------------------------------------------------------------

    async def adopt(self, found: FoundDevice) -> str | None:
        """Supervise ``found`` (or re-target it when it moved); returns its key, ``None`` if unusable."""
        if found.family is None or self._closed:
            return None
        port = found.port if found.port is not None else default_port(found.family)
        async with self._lock:
            supervised = self._match(found, port)
            if supervised is None:
                key = self._free_key(device_key_for(found))
                target = DeviceTarget(found.address, port, found.family, key, found.name)
                supervised = Supervised(key, target, {found.identity})
                self._devices[key] = supervised
                self._by_identity[found.identity] = key
                self.stats.adopted += 1
                log.info(
                    "device adopted",
                    extra={"device_key": key, "address": found.address, "port": port, "family": found.family},
                )
                self._start(supervised)
                return key
            supervised.identities.add(found.identity)
            self._by_identity[found.identity] = supervised.key
            old = supervised.target
            if (old.address, old.port, old.family) == (found.address, port, found.family):
                return supervised.key
            # Same device, new address (DHCP) or a corrected family: restart, never duplicate.
            self._moved(
                supervised,
                DeviceTarget(found.address, port, found.family, supervised.key, found.name or old.name),
                "its announcement",
            )
            await self._stop_driver(supervised)
            self._start(supervised)
            return supervised.key

    def _moved(self, supervised: Supervised, target: DeviceTarget, recognised_by: str) -> None:
        """Point ``supervised`` at ``target``, the same device somewhere else (counted and logged)."""
        old, supervised.target = supervised.target, target
        self.stats.moved += 1
        log.info(
            "device moved",
            extra={
                "device_key": supervised.key,
                "from": f"{old.address}:{old.port}",
                "to": f"{target.address}:{target.port}",
                "recognised_by": recognised_by,
            },
        )

    def _match(self, found: FoundDevice, port: int) -> Supervised | None:
        key = self._by_identity.get(found.identity)
        if key is not None and key in self._devices:
            return self._devices[key]
        # Discovery may learn a device's id after adopting it at its endpoint: same device.
        for supervised in self._devices.values():
            target = supervised.target
            if (target.address, target.port) == (found.address, port) and (
                vendor_for_family(target.family) is vendor_for_family(found.family or target.family)
            ):
                return supervised
        return None

    def _free_key(self, key: str) -> str:
        candidate, n = key, 2
        while candidate in self._devices:
            candidate = f"{key[:120]}-{n}"
            n += 1
        return candidate

    async def remove(self, device_key: str) -> bool:
        """Stop supervising ``device_key``; returns whether it was supervised."""
        async with self._lock:
            supervised = self._devices.pop(device_key, None)
            if supervised is None:
                return False
            for identity in supervised.identities:
                self._by_identity.pop(identity, None)
            self.stats.removed += 1
            if supervised.holding is not None:
                supervised.holding.cancel()
            await self._stop_driver(supervised)
            self._retire(supervised)
            self.listener.forget(device_key)
            return True

    async def close(self) -> None:
        """Stop every driver (politely, then by cancelling); safe to call twice."""
        self._closed = True
        devices = list(self._devices.values())
        for supervised in devices:
            if supervised.holding is not None:
                supervised.holding.cancel()
        await asyncio.gather(*(self._stop_driver(s) for s in devices))

    # -- one device's task --------------------------------------------------------------

    def _start(self, supervised: Supervised) -> None:
        self.listener.track(supervised.key)
        supervised.task = asyncio.get_running_loop().create_task(
            self._supervise(supervised), name=f"driver-{supervised.key}"
        )

    async def _supervise(self, supervised: Supervised) -> None:
        loop = asyncio.get_running_loop()
        delay = self.restart_initial_s
        while True:
            self._retire(supervised)
            driver = self._factory(supervised.target, self, self.options)
            supervised.driver = driver
            started = loop.time()
            try:
                await driver.run()
                return  # stopped on purpose
            except Exception as exc:  # a crashing driver must not take the agent down
                supervised.crashes += 1
                supervised.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.crashes += 1
                log.exception(
                    "driver crashed, restarting",
                    extra={"device_key": supervised.key, "crashes": supervised.crashes},
                )
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.stop_timeout_s):
                        await driver.stop()
                self.link_changed(supervised.key, False, "driver_crashed")
            if loop.time() - started >= _HEALTHY_RUN_S:
                delay = self.restart_initial_s
            # Jitter keeps a rack of crashing drivers from reconnecting in lock-step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not security  # nosec B311
            delay = min(delay * 2, self.restart_max_s)
            self.stats.restarts += 1
            self.listener.track(supervised.key)

    async def _stop_driver(self, supervised: Supervised) -> None:
        task, supervised.task = supervised.task, None
        driver = supervised.driver
        if driver is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.stop_timeout_s):
                    await driver.stop()
        if task is not None:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- DeviceListener: forward what the drivers say ----------------------------------

    def device_updated(self, device: Device) -> None:
        """Forward a driver's state to the listener (unless it is a known device that moved)."""
        supervised = self._devices.get(device.device_key)
        if supervised is None or self._held(supervised, device):
            return
        self.listener.device_updated(device)

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        """Forward a driver's meters to the listener."""
        supervised = self._devices.get(device_key)
        if supervised is not None and supervised.held is None:
            self.listener.meters_updated(device_key, meters)

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        """Forward a driver's link change to the listener."""
        supervised = self._devices.get(device_key)
        if supervised is None:
            return
        supervised.online = online
        if online:
            supervised.link_down.clear()
        else:
            supervised.link_down.set()
        if supervised.held is None:
            self.listener.link_changed(device_key, online, reason)

    # -- a device found again under a new address ---------------------------------------

    def _held(self, supervised: Supervised, device: Device) -> bool:
        """Whether ``device``'s report is kept back: it is (or may be) a known device that moved."""
        if supervised.held is not None:
            supervised.held = device  # still being told apart: the latest state waits
            return True
        if supervised.distinct or not device.device_id:
            return False
        identity = f"id:{device.vendor.value}:{device.device_id}"
        owner_key = self._by_identity.get(identity)
        owner = self._devices.get(owner_key) if owner_key is not None else None
        if owner is None or owner is supervised or owner.target.family is not supervised.target.family:
            if owner is None:
                supervised.identities.add(identity)
                self._by_identity[identity] = supervised.key
            return False
        supervised.held = device
        supervised.holding = asyncio.get_running_loop().create_task(
            self._tell_apart(supervised, owner), name=f"tell-apart-{supervised.key}"
        )
        return True

    async def _tell_apart(self, new: Supervised, owner: Supervised) -> None:
        """Merge ``new`` into ``owner`` once ``owner``'s link is down, or report ``new`` as its own device."""
        # The owner's driver notices a dead link within its silence timeout, and a request in
        # flight then may take its own timeout to fail: waited for generously, since the wait
        # ends the moment the link goes down, and only two devices answering under one id
        # (rare) wait it out.
        if owner.online:
            wait_s = 2 * self.options.silence_timeout_s + self.options.command_timeout_s + 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await owner.link_down.wait()
        async with self._lock:
            if self._devices.get(new.key) is not new:
                return  # removed meanwhile
            if self._devices.get(owner.key) is owner and not owner.online:
                await self._merge(new, owner)
                return
            if self._devices.get(owner.key) is owner:
                # Both answer: two devices that share an id (a Shure device id is a name users set).
                log.warning(
                    "two devices report the same id; both are kept",
                    extra={"device_key": new.key, "other": owner.key},
                )
            # Told apart (or the known device was removed meanwhile): reported from now on.
            new.distinct = True
            held, new.held, new.holding = new.held, None, None
            if held is not None:
                self.listener.link_changed(new.key, True, "connected")
                self.listener.device_updated(held)

    async def _merge(self, new: Supervised, owner: Supervised) -> None:
        """``new`` is ``owner`` at another address: re-target ``owner`` there and drop ``new``."""
        self._devices.pop(new.key, None)
        new.holding = None
        await self._stop_driver(new)
        self._retire(new)
        self.listener.forget(new.key)
        old = owner.target
        # The old address is no longer this device's: a device given it later is another one.
        for identity in [i for i in owner.identities if i.startswith("at:")]:
            owner.identities.discard(identity)
            if self._by_identity.get(identity) == owner.key:
                del self._by_identity[identity]
        for identity in new.identities:
            owner.identities.add(identity)
            self._by_identity[identity] = owner.key
        self._moved(
            owner,
            DeviceTarget(
                new.target.address, new.target.port, new.target.family, owner.key, old.name or new.target.name
            ),
            "its id, read from the device",
        )
        await self._stop_driver(owner)
        self._start(owner)
