"""Finding receivers on the venue network: mDNS/DNS-SD, Shure SLP and a static list.

Sources report :class:`FoundDevice` sightings; :class:`DiscoveryService` merges them by
identity, publishes what is new and hands supported devices the policy allows to the
supervisor. Multicast is only used on the configured interface addresses (loopback unless a
venue sets its LAN interface address).
"""

from micboard.agent.discovery.dcid import (
    SHURE_DCIDS,
    DcidEntry,
    default_port,
    family_for_model,
    lookup_dcid,
    vendor_for_family,
    vendor_for_model,
)
from micboard.agent.discovery.found import Change, DiscoveryRegistry, FoundDevice, Sighting
from micboard.agent.discovery.mdns import (
    DEFAULT_SERVICE_TYPES,
    SHURE_SERVICE,
    SSC_UDP_SERVICE,
    MdnsAnnouncer,
    MdnsBrowser,
)
from micboard.agent.discovery.policy import AdoptionPolicy
from micboard.agent.discovery.service import (
    DeviceCallback,
    DiscoveryConfig,
    DiscoveryService,
    DiscoveryStats,
    ScanProgress,
)
from micboard.agent.discovery.slp import SLP_GROUP, SLP_PORT, SlpAnnouncer, SlpListener
from micboard.agent.discovery.static import StaticDevice, static_devices

__all__ = [
    "DEFAULT_SERVICE_TYPES",
    "SHURE_DCIDS",
    "SHURE_SERVICE",
    "SLP_GROUP",
    "SLP_PORT",
    "SSC_UDP_SERVICE",
    "AdoptionPolicy",
    "Change",
    "DcidEntry",
    "DeviceCallback",
    "DiscoveryConfig",
    "DiscoveryRegistry",
    "DiscoveryService",
    "DiscoveryStats",
    "FoundDevice",
    "MdnsAnnouncer",
    "MdnsBrowser",
    "ScanProgress",
    "Sighting",
    "SlpAnnouncer",
    "SlpListener",
    "StaticDevice",
    "default_port",
    "family_for_model",
    "lookup_dcid",
    "static_devices",
    "vendor_for_family",
    "vendor_for_model",
]
