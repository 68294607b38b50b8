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

Across restarts, given a state directory, the supervisor remembers under which key each id was
published (:mod:`micboard.agent.identities`), so that a receiver that got a new address while
the agent was down, or a Shure receiver first seen over SLP on one boot and over mDNS on the
next, keeps its key. A device announced with a remembered id is adopted under the remembered
key. Any other device adopted while a remembered device of its vendor is not supervised yet in
this run is *pending* (a Shure receiver's SLP id is not the device id its driver reads): its
reports wait until its driver reads its id, or, if it never answers, until about the dead-link
timeout has passed (then it is reported under its own key). Its id then decides:

- remembered under its key, or nowhere: reported as it is (and remembered);
- remembered under a key no device holds: re-keyed (its driver restarted under that key)
  before anything of it was reported;
- remembered under a key a device holds whose link is down and that never read an id (a stale
  static entry at the old address): merged into that device, as above;
- remembered under a key a device holds that answers: both are kept, with a warning (and from
  then on it is remembered under the key it is reported under);
- its id is not remembered, but its key is, for another id (it got the address of a device
  not seen yet): a key of its own, with a suffix.

Without a state directory nothing is kept across restarts: what this run learns is remembered
for this run only.

Two receivers that swapped addresses while the agent was down each hold the key the other was
published under: their keys are swapped, and both keep their tiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from micboard.agent.discovery.dcid import default_port, vendor_for_family
from micboard.agent.discovery.found import FoundDevice
from micboard.agent.drivers.base import DeviceListener, DeviceTarget, DriverOptions, ReceiverDriver
from micboard.agent.drivers.sennheiser import SscDriver
from micboard.agent.drivers.shure import ShureDriver
from micboard.agent.identities import STABLE_PREFIX, DeviceKeyMemory
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
    recalled: int = 0
    """Devices re-keyed to the key their id was published under in an earlier run."""


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
    # Adopted without an id while a remembered device is unaccounted for: reports wait for its id.
    pending: bool = False
    # The latest link change while reports wait (after the held state, if any).
    held_link: tuple[bool, str] | None = None

    @property
    def waiting(self) -> bool:
        """Whether this device's reports are kept back for now."""
        return self.pending or self.held is not None


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
        state_dir: Path | None = None,
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
        # Which key each id was published under, kept across restarts (nothing kept without a state dir).
        self.key_memory = DeviceKeyMemory.in_state_dir(state_dir)
        # Set (and replaced) whenever a device settles, moves, is re-keyed or its link changes.
        self._changed = asyncio.Event()

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

    def _is_closed(self) -> bool:
        # A call, not the attribute: it may have changed while the caller awaited the lock.
        return self._closed

    async def adopt(self, found: FoundDevice) -> str | None:
        """Supervise ``found`` (or re-target it when it moved); returns its key, ``None`` if unusable."""
        if found.family is None or self._closed:
            return None
        port = found.port if found.port is not None else default_port(found.family)
        async with self._lock:
            if self._is_closed():
                return None  # closed while this waited for the lock
            supervised = self._match(found, port)
            if supervised is None:
                key, pending = self._key_for_new(found)
                target = DeviceTarget(found.address, port, found.family, key, found.name)
                supervised = Supervised(key, target, {found.identity}, pending=pending)
                self._devices[key] = supervised
                self._by_identity[found.identity] = key
                self.stats.adopted += 1
                log.info(
                    "device adopted",
                    extra={
                        "device_key": key,
                        "address": found.address,
                        "port": port,
                        "family": found.family,
                        "pending_id": pending,
                    },
                )
                self._learn(supervised, only_new=True)
                self._start(supervised)
                if pending:
                    supervised.holding = asyncio.get_running_loop().create_task(
                        self._pending_timeout(supervised), name=f"pending-{key}"
                    )
                return key
            supervised.identities.add(found.identity)
            self._by_identity[found.identity] = supervised.key
            self._learn(supervised, only_new=True)
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

    def _free_key(self, key: str, allowed: Iterable[str] = ()) -> str:
        """``key`` or ``key`` with a suffix: held by no device, remembered for no id but ``allowed``."""
        allowed = frozenset(allowed)
        candidate, n = key, 2
        while candidate in self._devices or not self.key_memory.identities_of(candidate) <= allowed:
            candidate = f"{key[:120]}-{n}"
            n += 1
        return candidate

    def _claimed(self, identity: str) -> bool:
        """Whether a device supervised now has ``identity``."""
        key = self._by_identity.get(identity)
        return key is not None and key in self._devices

    def _key_for_new(self, found: FoundDevice) -> tuple[str, bool]:
        """The key a newly adopted ``found`` starts under, and whether its reports wait for its id."""
        base = device_key_for(found)
        family = found.family
        vendor = found.vendor or (vendor_for_family(family) if family is not None else None)
        prefix = f"{STABLE_PREFIX}{vendor.value}:" if vendor is not None else STABLE_PREFIX
        # A remembered device not seen yet in this run may be this one, under an id it reads later.
        unaccounted = any(not self._claimed(i) for i in self.key_memory.identities(prefix))
        if found.device_id:
            remembered = self.key_memory.key_for(found.identity)
            if remembered is not None and remembered not in self._devices:
                return remembered, False
            # Remembered under a key another device holds now: settled once its driver reads its id.
            return self._free_key(base, {found.identity}), unaccounted or remembered is not None
        # Its address key, even when remembered for an id no device has yet: most likely that device.
        owners = self.key_memory.identities_of(base)
        if base not in self._devices and not any(self._claimed(i) for i in owners):
            return base, unaccounted
        return self._free_key(base), unaccounted

    def _learn(self, supervised: Supervised, *, only_new: bool = False) -> None:
        """Remember ``supervised``'s ids under its key (``only_new``: only ids remembered nowhere else).

        Not while its reports wait: its key may not be its own yet.
        """
        if supervised.waiting:
            return
        for identity in supervised.identities:
            if not identity.startswith(STABLE_PREFIX) or self._by_identity.get(identity) != supervised.key:
                continue
            if only_new and self.key_memory.key_for(identity) not in (None, supervised.key):
                continue
            self.key_memory.remember(identity, supervised.key)

    def _notify(self) -> None:
        """Wake whoever waits for a device to settle, move or free its key."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _wait_s(self) -> float:
        """How long a device may take to connect and answer, or a dead link to be noticed."""
        options = self.options
        return options.connect_timeout_s + 2 * options.silence_timeout_s + options.command_timeout_s + 1.0

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
            self._notify()
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
        if self._closed:
            return  # closed while a device was being re-keyed or merged
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
        if supervised is not None and not supervised.waiting:
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
        if supervised.waiting:
            supervised.held_link = (online, reason)
        else:
            self.listener.link_changed(device_key, online, reason)
        self._notify()

    # -- a device found again under a new address ---------------------------------------

    def _held(self, supervised: Supervised, device: Device) -> bool:
        """Whether ``device``'s report is kept back: it is (or may be) a known device that moved."""
        if supervised.held is not None:
            # Still being told apart or re-keyed: the latest state waits (and the link with it).
            supervised.held, supervised.held_link = device, None
            return True
        was_pending, supervised.pending = supervised.pending, False
        if was_pending:
            timer, supervised.holding = supervised.holding, None
            if timer is not None:
                timer.cancel()
        if supervised.distinct:
            return self._let_go(supervised, was_pending)
        identity: str | None = None
        if device.device_id:
            identity = f"{STABLE_PREFIX}{device.vendor.value}:{device.device_id}"
            owner_key = self._by_identity.get(identity)
            owner = self._devices.get(owner_key) if owner_key is not None else None
            if owner is not None and owner is not supervised:
                if owner.target.family is not supervised.target.family:
                    return self._let_go(supervised, was_pending)
                self._hold(supervised, device, self._tell_apart(supervised, owner), "tell-apart")
                return True
            # Its own from now on, though linked to it only once its key is settled: a device that
            # holds the key this id is remembered under may still turn out to say it too.
            supervised.identities.add(identity)
        key = self._remembered_key(supervised, identity)
        if key is None:
            self._claim(supervised)
            self._learn(supervised)
            return self._let_go(supervised, was_pending)
        self._hold(supervised, device, self._recall(supervised, key), "recall")
        return True

    def _claim(self, supervised: Supervised) -> None:
        """Link ``supervised``'s ids to it, but those another supervised device has already."""
        for identity in supervised.identities:
            owner = self._by_identity.get(identity)
            if owner is None or owner not in self._devices:
                self._by_identity[identity] = supervised.key

    def _let_go(self, supervised: Supervised, was_pending: bool) -> bool:
        """The report in hand is forwarded (after the link change that waited, if any): ``False``."""
        if was_pending:
            self._release(supervised)
        return False

    def _hold(
        self, supervised: Supervised, device: Device, work: Coroutine[None, None, None], name: str
    ) -> None:
        """Keep ``device`` (the latest report, newer than any link change that waited) while ``work`` runs."""
        supervised.held, supervised.held_link = device, None
        supervised.holding = asyncio.get_running_loop().create_task(work, name=f"{name}-{supervised.key}")

    def _release(self, supervised: Supervised) -> None:
        """Report what waited: the held state (the link up with it), then a later link change."""
        held, supervised.held = supervised.held, None
        link, supervised.held_link = supervised.held_link, None
        supervised.holding = None
        if held is not None:
            self.listener.link_changed(supervised.key, True, "connected")
            self.listener.device_updated(held)
        if link is not None:
            self.listener.link_changed(supervised.key, *link)
        self._notify()

    async def _pending_timeout(self, supervised: Supervised) -> None:
        """A pending device that did not tell its id in time is reported under its own key."""
        await asyncio.sleep(self._wait_s())
        key = supervised.key
        if self._devices.get(key) is supervised and supervised.pending:
            supervised.pending = False
            log.info("device id not read in time, reported under its key", extra={"device_key": key})
            self._release(supervised)

    def _remembered_key(self, supervised: Supervised, identity: str | None) -> str | None:
        """The key ``supervised`` (which just said ``identity``) must be reported under, ``None``: its own."""
        memory = self.key_memory
        ids = sorted(i for i in supervised.identities if i.startswith(STABLE_PREFIX))
        if not ids or any(memory.key_for(i) == supervised.key for i in ids):
            return None  # no id known, or it was published under this key before (by one of its ids)
        for candidate in (identity, *ids):
            remembered = None if candidate is None else memory.key_for(candidate)
            if remembered is not None:
                return remembered
        if memory.identities_of(supervised.key) - supervised.identities:
            # Its key was another device's (it got that one's address): a key of its own.
            return self._free_key(supervised.key, supervised.identities)
        return None

    async def _recall(self, supervised: Supervised, key: str) -> None:
        """Re-key ``supervised`` to ``key`` once no other device holds it (see module doc)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s()
        while True:
            changed = self._changed
            timed_out = loop.time() >= deadline
            async with self._lock:
                if self._closed or self._devices.get(supervised.key) is not supervised:
                    return  # closed or removed meanwhile
                if supervised.key == key:
                    return  # given this key meanwhile (swapped with the device that held it)
                owner = self._owner(supervised)
                if owner is None:
                    holder = self._devices.get(key)
                    if holder is not None and holder.waiting and self._wants(holder, supervised.key):
                        # Two receivers that swapped addresses while the agent was down: each
                        # holds the key the other was published under.
                        await self._swap(supervised, holder)
                        return
                    if holder is None:
                        ids = [i for i in supervised.identities if i.startswith(STABLE_PREFIX)]
                        if any(self.key_memory.key_for(i) == key for i in ids):
                            why = "its id, remembered from an earlier run"
                        else:
                            why = "its key remembered for another device"
                        await self._rekey(supervised, key, why)
                        return
                    busy = holder.waiting
                    has_id = any(i.startswith(STABLE_PREFIX) for i in holder.identities)
                    gave_up = holder.link_down.is_set() or not busy or timed_out
                    if not has_id and not holder.online and gave_up:
                        # The key's holder never answered with an id: this device, found elsewhere.
                        await self._merge(supervised, holder, "its id, remembered from an earlier run")
                        return
                    if not busy or timed_out:
                        await self._keep_own_key(supervised, key, holder)
                        return
            if owner is not None:
                # Another device supervised now says the same id: told apart as within one run.
                await self._tell_apart(supervised, owner)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await changed.wait()

    def _wants(self, supervised: Supervised, key: str) -> bool:
        """Whether one of ``supervised``'s ids is remembered under ``key``."""
        return any(
            i.startswith(STABLE_PREFIX) and self.key_memory.key_for(i) == key for i in supervised.identities
        )

    async def _swap(self, first: Supervised, second: Supervised) -> None:
        """Give ``first`` and ``second`` each other's keys, restarting both drivers (nothing was reported)."""
        keys = [second.key, first.key]
        for supervised in (first, second):
            await self._unseat(supervised)
        for supervised, key in zip((first, second), keys, strict=True):
            self._renamed(supervised, key, "its id, keys swapped")
        for supervised in (first, second):
            self._devices[supervised.key] = supervised
        for supervised in (first, second):
            self._claim(supervised)
            self._learn(supervised)
            self._start(supervised)
        self._notify()

    def _owner(self, supervised: Supervised) -> Supervised | None:
        """Another supervised device (same family) that has one of ``supervised``'s ids, if any."""
        for identity in supervised.identities:
            if not identity.startswith(STABLE_PREFIX):
                continue
            key = self._by_identity.get(identity)
            other = self._devices.get(key) if key is not None else None
            if other is None or other is supervised:
                continue
            if other.target.family is supervised.target.family:
                return other
        return None

    async def _keep_own_key(self, supervised: Supervised, key: str, holder: Supervised) -> None:
        """``key`` stays ``holder``'s (it answers): ``supervised`` is reported under a key of its own."""
        log.warning(
            "remembered device key is held by another device that answers; reported under another key",
            extra={"device_key": supervised.key, "remembered": key, "other": holder.key},
        )
        if self.key_memory.identities_of(supervised.key) - supervised.identities:
            await self._rekey(supervised, self._free_key(supervised.key, supervised.identities), "its own id")
            return
        # Published under this key now, so remembered under it from now on.
        self._release(supervised)
        self._claim(supervised)
        self._learn(supervised)

    async def _rekey(self, supervised: Supervised, key: str, recognised_by: str) -> None:
        """Restart ``supervised``'s driver under ``key``; nothing it reported under its old key was sent."""
        await self._unseat(supervised)
        self._renamed(supervised, key, recognised_by)
        self._claim(supervised)
        self._devices[key] = supervised
        self._learn(supervised)
        self._start(supervised)
        self._notify()

    async def _unseat(self, supervised: Supervised) -> None:
        """Take ``supervised`` out of the devices and stop its driver, before it changes key."""
        self._devices.pop(supervised.key, None)
        await self._stop_driver(supervised)
        self._retire(supervised)
        self.listener.forget(supervised.key)

    def _renamed(self, supervised: Supervised, key: str, recognised_by: str) -> None:
        """``supervised`` (unseated) under ``key`` from now on, starting afresh: nothing of it waits."""
        old_key = supervised.key
        supervised.key = key
        supervised.target = dataclasses.replace(supervised.target, device_key=key)
        for identity in supervised.identities:
            if self._by_identity.get(identity) == old_key:
                self._by_identity[identity] = key
        supervised.held = supervised.held_link = supervised.holding = None
        supervised.pending = False
        supervised.online = False
        supervised.link_down.clear()
        self.stats.recalled += 1
        log.info("device re-keyed", extra={"device_key": key, "was": old_key, "recognised_by": recognised_by})

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
            self._release(new)

    async def _merge(
        self, new: Supervised, owner: Supervised, recognised_by: str = "its id, read from the device"
    ) -> None:
        """``new`` is ``owner`` at another address: re-target ``owner`` there and drop ``new``."""
        self._devices.pop(new.key, None)
        new.holding = None
        await self._stop_driver(new)
        self._retire(new)
        self.listener.forget(new.key)
        if owner.pending:
            # Its id was never read: what it waited to report is not this device's any more.
            timer, owner.holding = owner.holding, None
            if timer is not None:
                timer.cancel()
            owner.pending, owner.held_link = False, None
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
            recognised_by,
        )
        self._learn(owner)
        await self._stop_driver(owner)
        self._start(owner)
        self._notify()
