"""Devices a site lists by address, for receivers that announce nothing (or not on this LAN)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from micboard.agent.discovery.dcid import default_port, vendor_for_family
from micboard.agent.discovery.found import FoundDevice
from micboard.shared.errors import ConfigError
from micboard.shared.model import Family


@dataclass(frozen=True, slots=True)
class StaticDevice:
    """One configured device: where it is and which family it is; port defaults by family."""

    address: str
    family: Family
    port: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ConfigError("a static device needs an address")
        if self.port is not None and not 0 < self.port <= 0xFFFF:
            raise ConfigError(f"static device {self.address}: port {self.port} is not 1..65535")

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> StaticDevice:
        """Build one from a config entry ``{address, family, port?, name?}``; raises :class:`ConfigError`."""
        unknown = set(entry) - {"address", "family", "port", "name"}
        if unknown:
            raise ConfigError(f"static device: unknown keys {sorted(unknown)}")
        address = entry.get("address")
        if not isinstance(address, str):
            raise ConfigError("a static device needs an address")
        try:
            family = Family(str(entry.get("family", "")).lower())
        except ValueError:
            choices = ", ".join(f.value for f in Family)
            raise ConfigError(f"static device {address}: family must be one of {choices}") from None
        port = entry.get("port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise ConfigError(f"static device {address}: port must be an integer")
        name = entry.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"static device {address}: name must be text")
        return cls(address=address.strip(), family=family, port=port, name=name)

    def to_found(self) -> FoundDevice:
        """This entry as a sighting (always supported: the family names a driver)."""
        return FoundDevice(
            source="static",
            address=self.address,
            port=self.port if self.port is not None else default_port(self.family),
            vendor=vendor_for_family(self.family),
            family=self.family,
            name=self.name,
            supported=True,
        )


def static_devices(entries: Iterable[Mapping[str, Any] | StaticDevice]) -> tuple[StaticDevice, ...]:
    """Config entries (mappings or ready :class:`StaticDevice` objects) as static devices."""
    return tuple(e if isinstance(e, StaticDevice) else StaticDevice.from_mapping(e) for e in entries)
