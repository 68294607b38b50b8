"""DNS-SD discovery: browse ``_ssc._udp`` (Sennheiser), ``_shure._tcp`` (newer Shure) and any
configured extra types, and announce simulators the same way.

Zeroconf is bound to the configured interface addresses only; the default is loopback, and
a venue configures the address of its LAN interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import zeroconf
from zeroconf import BadTypeInNameException, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

# zeroconf's own check of a service type, the one its browser applies. The package re-exports
# it only for compatibility (not in __all__), so it is taken from where it is defined, and from
# the re-export should a later release move it.
try:
    from zeroconf._utils.name import service_type_name
except ImportError:  # pragma: no cover - depends on the zeroconf release
    service_type_name = zeroconf.service_type_name  # type: ignore[attr-defined]

from micboard.agent.discovery.dcid import family_for_model, vendor_for_model
from micboard.agent.discovery.found import FoundDevice
from micboard.agent.drivers.simulation import Announcement
from micboard.shared.model import Vendor

logger = logging.getLogger(__name__)

SHURE_SERVICE = "_shure._tcp.local."
"""DNS-SD type some newer Shure devices register, with TXT ``model=``."""

SSC_UDP_SERVICE = "_ssc._udp.local."
"""DNS-SD type every Sennheiser Sound Control device registers, with TXT ``product``."""

SSC_TCP_SERVICE = "_ssc._tcp.local."
"""DNS-SD type of SSC devices that also speak TCP."""

DEFAULT_SERVICE_TYPES: tuple[str, ...] = (SSC_UDP_SERVICE, SHURE_SERVICE)
"""What :class:`MdnsBrowser` browses unless told otherwise."""

_MODEL_KEYS: Mapping[str, tuple[str, ...]] = {
    SHURE_SERVICE: ("model",),
    SSC_UDP_SERVICE: ("product", "model"),
    SSC_TCP_SERVICE: ("product", "model"),
}
_ANY_MODEL_KEYS = ("model", "product")
_ID_KEYS = ("serial", "device_id", "deviceid")


def full_service_type(text: str) -> str:
    """``text`` as the full DNS-SD type zeroconf browses: ``_ssc._tcp``, ``_ssc._tcp.local`` and
    ``_ssc._tcp.local.`` all become ``_ssc._tcp.local.``.

    Raises ``ValueError`` naming ``text`` when it is no DNS-SD service type (no leading
    underscore, a protocol other than ``_tcp`` or ``_udp``, a name over 15 characters, ...).
    """
    name = text.strip().rstrip(".")
    if not name.lower().endswith(".local"):
        name += ".local"
    full = name + "."
    try:
        # zeroconf's own check: what passes here, zeroconf browses.
        service_type_name(full)
    except BadTypeInNameException as exc:
        raise ValueError(
            f"{text!r} is not a DNS-SD service type such as _ssc._udp or _shure._tcp.local. ({exc})"
        ) from None
    return full


def _text(properties: Mapping[bytes, bytes | None], keys: Sequence[str]) -> str | None:
    lowered = {key.decode("utf-8", "replace").lower(): value for key, value in properties.items()}
    for key in keys:
        value = lowered.get(key)
        if value:
            text = value.decode("utf-8", "replace").strip()
            if text:
                return text
    return None


def _pick_address(addresses: Sequence[str]) -> str | None:
    # The drivers reach devices over IPv4 first; an IPv6-only device still gets an address.
    ordered = sorted(addresses, key=lambda a: ipaddress.ip_address(a.split("%")[0]).version)
    return ordered[0] if ordered else None


def instance_label(service_type: str, name: str) -> str:
    """The instance part of a full service name (``Rack 1`` of ``Rack 1._shure._tcp.local.``)."""
    suffix = "." + service_type
    return name[: -len(suffix)] if name.lower().endswith(suffix.lower()) else name


def found_from_service(
    service_type: str,
    name: str,
    *,
    port: int | None,
    addresses: Sequence[str],
    properties: Mapping[bytes, bytes | None],
) -> FoundDevice | None:
    """What a resolved DNS-SD service says about a device, or ``None`` when it has no address."""
    address = _pick_address(addresses)
    if address is None:
        return None
    kind = service_type.lower()
    model = _text(properties, _MODEL_KEYS.get(kind, _ANY_MODEL_KEYS))
    vendor: Vendor | None
    if kind == SHURE_SERVICE:
        vendor = Vendor.SHURE
    elif kind.startswith("_ssc."):
        vendor = Vendor.SENNHEISER
    else:
        vendor = vendor_for_model(model)
    family = family_for_model(model)
    return FoundDevice(
        source="mdns",
        address=address,
        port=port or None,
        vendor=vendor,
        family=family,
        model=model,
        device_id=_text(properties, _ID_KEYS),
        name=instance_label(service_type, name) or None,
        supported=family is not None,
    )


@dataclass(slots=True)
class MdnsStats:
    """Counters of an mDNS browser."""

    events: int = 0
    resolved: int = 0
    unresolved: int = 0
    found: int = 0


class MdnsBrowser:
    """Browses DNS-SD service types and reports every resolved service as a :class:`FoundDevice`.

    ``on_found`` is called in the event loop. Pass ``zeroconf`` to share an instance (it is
    then not closed here); otherwise one is created bound to ``interfaces``. A service type may
    leave out ``.local.`` (see :func:`full_service_type`); one that is no DNS-SD type raises
    ``ValueError``.
    """

    def __init__(
        self,
        on_found: Callable[[FoundDevice], None],
        *,
        interfaces: Iterable[str] = ("127.0.0.1",),
        service_types: Iterable[str] = DEFAULT_SERVICE_TYPES,
        resolve_timeout_s: float = 3.0,
        zeroconf: AsyncZeroconf | None = None,
    ) -> None:
        self._on_found = on_found
        self.interfaces = tuple(interfaces)
        self.service_types = tuple(dict.fromkeys(full_service_type(t) for t in service_types))
        self.resolve_timeout_s = resolve_timeout_s
        self.stats = MdnsStats()
        self._shared = zeroconf
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._known: set[tuple[str, str]] = set()

    @property
    def running(self) -> bool:
        """Whether the browser is browsing."""
        return self._browser is not None

    async def start(self) -> None:
        """Start browsing."""
        if self._browser is not None:
            return
        self._aiozc = self._shared or AsyncZeroconf(interfaces=list(self.interfaces))
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, list(self.service_types), handlers=[self._on_change]
        )
        logger.info(
            "mdns browsing",
            extra={"types": ",".join(self.service_types), "interfaces": ",".join(self.interfaces)},
        )

    def refresh(self) -> None:
        """Resolve every service seen so far again, so that each is reported anew."""
        for service_type, name in sorted(self._known):
            self._resolve_later(service_type, name)

    async def close(self) -> None:
        """Stop browsing, cancel pending resolutions and close zeroconf if it is ours."""
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is not None and aiozc is not self._shared:
            await aiozc.async_close()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        self.stats.events += 1
        key = (service_type, name)
        if state_change is ServiceStateChange.Removed:
            # A device that stops announcing is not gone: the driver's liveness check decides.
            self._known.discard(key)
            logger.debug("mdns service removed", extra={"service": name})
            return
        self._known.add(key)
        self._resolve_later(service_type, name)

    def _resolve_later(self, service_type: str, name: str) -> None:
        key = (service_type, name)
        if key in self._resolving or self._browser is None:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name), name=f"mdns-{name}")
        self._resolving[key] = task
        task.add_done_callback(lambda _t: self._resolving.pop(key, None))

    async def _resolve(self, service_type: str, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:  # pragma: no cover - closing cancels resolutions before dropping zeroconf
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(aiozc.zeroconf, int(self.resolve_timeout_s * 1000)):
            self.stats.unresolved += 1
            logger.debug("mdns service did not resolve", extra={"service": name})
            return
        self.stats.resolved += 1
        found = found_from_service(
            service_type,
            name,
            port=info.port,
            addresses=info.parsed_scoped_addresses(IPVersion.All),
            properties=info.properties,
        )
        if found is None:
            self.stats.unresolved += 1
            return
        self.stats.found += 1
        self._on_found(found)


def _service_name(announcement: Announcement) -> tuple[str, str]:
    service_type = announcement.service_type
    if not service_type.endswith("."):
        service_type += "."
    return service_type, f"{announcement.instance_name}.{service_type}"


def _host_label(instance_name: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", instance_name.lower()).strip("-")[:63]
    return label or "micboard-device"


class MdnsAnnouncer:
    """Registers simulators' :class:`Announcement` objects on DNS-SD; unregisters them on close.

    Zeroconf is bound to ``interfaces`` (loopback by default) and the services point at
    ``address``. A clashing instance name is renamed by zeroconf rather than refused.
    """

    def __init__(
        self,
        announcements: Iterable[Announcement] = (),
        *,
        address: str = "127.0.0.1",
        interfaces: Iterable[str] = ("127.0.0.1",),
        zeroconf: AsyncZeroconf | None = None,
    ) -> None:
        self._pending = list(announcements)
        self.address = address
        self.interfaces = tuple(interfaces)
        self._shared = zeroconf
        self._aiozc: AsyncZeroconf | None = None
        # Keyed by the requested full name: an Announcement holds a dict and cannot be hashed.
        self._registered: dict[str, AsyncServiceInfo] = {}

    @property
    def names(self) -> list[str]:
        """The full service names registered now (after any rename)."""
        return [info.name for info in self._registered.values()]

    async def start(self) -> None:
        """Register every announcement given to the constructor."""
        self._zeroconf()
        pending, self._pending = self._pending, []
        await asyncio.gather(*(self.add(a) for a in pending))

    async def add(self, announcement: Announcement) -> str:
        """Register one more announcement; returns the full service name it got."""
        aiozc = self._zeroconf()
        service_type, key = _service_name(announcement)
        known = self._registered.get(key)
        if known is not None:
            return known.name
        info = AsyncServiceInfo(
            service_type,
            key,
            port=announcement.port,
            properties=dict(announcement.properties),
            addresses=[ipaddress.ip_address(self.address).packed],
            server=f"{_host_label(announcement.instance_name)}.local.",
        )
        self._registered[key] = info
        try:
            await (await aiozc.async_register_service(info, allow_name_change=True))
        except BaseException:
            self._registered.pop(key, None)
            raise
        return info.name

    async def remove(self, announcement: Announcement) -> None:
        """Unregister one announcement (sends goodbye packets); unknown ones are ignored."""
        info = self._registered.pop(_service_name(announcement)[1], None)
        if info is not None and self._aiozc is not None:
            await (await self._aiozc.async_unregister_service(info))

    async def close(self) -> None:
        """Unregister everything and close zeroconf if it is ours; safe to call twice."""
        registered, self._registered = list(self._registered.values()), {}
        if self._aiozc is not None:
            for info in registered:
                with contextlib.suppress(Exception):  # a failed goodbye must not stop the others
                    await (await self._aiozc.async_unregister_service(info))
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is not None and aiozc is not self._shared:
            await aiozc.async_close()

    def _zeroconf(self) -> AsyncZeroconf:
        if self._aiozc is None:
            self._aiozc = self._shared or AsyncZeroconf(interfaces=list(self.interfaces))
        return self._aiozc
