"""Which discovered devices the agent adopts (polls): allow and deny lists of networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from micboard.agent.discovery.found import FoundDevice
from micboard.shared.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: Iterable[str], what: str) -> tuple[Network, ...]:
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"discovery {what} entry {cidr!r} is not an address or network") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class AdoptionPolicy:
    """Adopt a supported device unless its address is denied; with an allow list, only inside it.

    Deny wins over allow. A host name matches no network: it is adopted only when there is no
    allow list. The default policy adopts every supported device.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_cidrs(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AdoptionPolicy:
        """Build from CIDR strings (``10.0.0.0/8``, ``192.0.2.7``); raises :class:`ConfigError`."""
        return cls(allow=_networks(allow, "allow"), deny=_networks(deny, "deny"))

    def allows_address(self, address: str) -> bool:
        """Whether ``address`` passes the allow and deny lists."""
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return not self.allow
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)

    def adopts(self, device: FoundDevice) -> bool:
        """Whether the agent should poll ``device``: supported, and its address passes."""
        return device.supported and device.family is not None and self.allows_address(device.address)
