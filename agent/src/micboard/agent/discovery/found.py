"""A device seen by discovery, and the registry that recognises it when it is seen again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from micboard.shared.envelope import DiscoveredBody
from micboard.shared.model import Family, Vendor

Source = Literal["mdns", "slp", "static"]


@dataclass(frozen=True, slots=True)
class FoundDevice:
    """One sighting of a device: where it answers and what it said it is."""

    source: Source
    address: str
    port: int | None = None
    vendor: Vendor | None = None
    family: Family | None = None
    model: str | None = None
    device_id: str | None = None
    name: str | None = None
    supported: bool = False

    @property
    def identity(self) -> str:
        """The key that stays the same while the device lives: its id when known, else where it is.

        With an id, a device that got a new address from DHCP is the same device, not a second one.
        """
        if self.device_id:
            return f"id:{self.vendor or '-'}:{self.device_id}"
        return f"at:{self.address}:{self.port if self.port is not None else '-'}"

    @property
    def endpoint(self) -> tuple[str, int | None]:
        """Address and port, the part of a sighting that changes when a device moves."""
        return self.address, self.port

    def to_body(self) -> DiscoveredBody:
        """This sighting as the body of a ``discovered`` event."""
        return DiscoveredBody(
            source=self.source,
            address=self.address,
            port=self.port,
            vendor=None if self.vendor is None else self.vendor.value,
            family=None if self.family is None else self.family.value,
            model=self.model,
            device_id=self.device_id,
            name=self.name,
            supported=self.supported,
        )


class Change(StrEnum):
    """How a sighting relates to what the registry knew."""

    NEW = "new"
    MOVED = "moved"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class Sighting:
    """The outcome of :meth:`DiscoveryRegistry.observe`: the merged device and what changed."""

    device: FoundDevice
    change: Change
    previous: FoundDevice | None = None


_DESCRIPTIVE = ("vendor", "family", "model", "device_id", "name")


class DiscoveryRegistry:
    """Every device discovery has seen, one entry per identity.

    Sightings are merged: a field a source does not know (``None``) keeps what another source
    said. A sighting without an id at the address and port of a known device with an id is
    that device; a first sighting with an id takes over the id-less entry at its endpoint.
    """

    def __init__(self) -> None:
        self._by_identity: dict[str, FoundDevice] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def devices(self) -> list[FoundDevice]:
        """Every known device, ordered by address then port for stable output."""
        return sorted(self._by_identity.values(), key=lambda d: (d.address, d.port or 0, d.identity))

    def get(self, identity: str) -> FoundDevice | None:
        """The device with ``identity``, or ``None``."""
        return self._by_identity.get(identity)

    def clear(self) -> None:
        """Forget every device, so that the next sighting of each is new again."""
        self._by_identity.clear()

    def observe(self, found: FoundDevice) -> Sighting:
        """Merge one sighting and say whether it is new, moved, changed or unchanged."""
        key, previous = self._match(found)
        if previous is None:
            self._by_identity[found.identity] = found
            return Sighting(found, Change.NEW)
        merged = _merge(previous, found)
        if key != merged.identity:
            del self._by_identity[key]
        self._by_identity[merged.identity] = merged
        if merged.endpoint != previous.endpoint:
            change = Change.MOVED
        elif any(getattr(merged, f) != getattr(previous, f) for f in (*_DESCRIPTIVE, "supported")):
            change = Change.CHANGED
        else:
            change = Change.UNCHANGED
        return Sighting(merged, change, previous)

    def _match(self, found: FoundDevice) -> tuple[str, FoundDevice | None]:
        known = self._by_identity.get(found.identity)
        if known is not None:
            return found.identity, known
        for key, device in self._by_identity.items():
            if device.endpoint != found.endpoint:
                continue
            # Only an entry without an id may be joined by endpoint: two devices with different
            # ids at one address are two devices (one took over the other's DHCP lease).
            if not found.device_id and device.device_id and _same_vendor(device, found):
                return key, device
            if found.device_id and not device.device_id and _same_vendor(device, found):
                return key, device
        return found.identity, None


def _same_vendor(a: FoundDevice, b: FoundDevice) -> bool:
    return a.vendor is None or b.vendor is None or a.vendor == b.vendor


def _merge(old: FoundDevice, new: FoundDevice) -> FoundDevice:
    updates = {f: getattr(old, f) for f in _DESCRIPTIVE if getattr(new, f) is None}
    merged = dataclasses.replace(new, **updates)
    if merged.family is not None and not merged.supported:
        # A family is only ever filled in for devices that have a driver.
        merged = dataclasses.replace(merged, supported=True)
    return merged
