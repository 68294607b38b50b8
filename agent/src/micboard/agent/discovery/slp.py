"""Shure discovery over SLPv2 (RFC 2608) on 239.255.254.253:8427.

Shure receivers multicast an Attribute Reply (function 7) whose attribute list carries
``(cid=<uuid>)``, ``(acn-fctn=<model>)``, ``(acn-uacn=<user name>)`` and
``(csl-esta.dmp=esta.sdt/<ip>:<port>;esta.dmp/cd:<DCID>)``; the DCID names the device class.
The group and port are Shure's, one digit off the registered SLP ones, so a stock SLP
library finds nothing there.

Multicast is only ever joined and sent on the configured interface addresses; the default
is loopback, and a venue configures the address of its LAN interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
import re
import socket
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import cast

from micboard.agent.discovery.dcid import (
    SHURE_CONTROL_PORT,
    family_for_model,
    is_shure_dcid,
    lookup_dcid,
    normalize_dcid,
    vendor_for_model,
)
from micboard.agent.discovery.found import FoundDevice
from micboard.agent.drivers.simulation import Announcement
from micboard.shared.errors import ConfigError
from micboard.shared.model import Vendor

logger = logging.getLogger(__name__)

SLP_GROUP = "239.255.254.253"
"""The multicast group Shure devices announce on."""

SLP_PORT = 8427
"""The UDP port Shure devices announce on."""

ACN_SERVICE_TYPE = "service:acn.esta"
"""The SLP service type of ACN (ANSI E1.17) components such as Shure receivers."""

CONTROL_PORT_TAG = "x-micboard-control-port"
"""Attribute a simulator adds when its control port is not the standard 2202."""

_VERSION = 2
# What the device model's text fields hold: a longer user name would fail the snapshot of a
# device adopted with it (the driver reports the name it was found under).
_MAX_TEXT = 128
_HEADER = struct.Struct(">BB3sH3sHH")  # version, function, length, flags, next ext, xid, lang len
_MAX_DATAGRAM = 65_535
_DCID_IN_DMP = re.compile(
    r"(?<![A-Za-z])c?d:([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})"
)


class FunctionId(IntEnum):
    """SLPv2 message types (RFC 2608 section 8)."""

    SRV_RQST = 1
    SRV_RPLY = 2
    SRV_REG = 3
    SRV_DEREG = 4
    SRV_ACK = 5
    ATTR_RQST = 6
    ATTR_RPLY = 7
    DA_ADVERT = 8
    SRV_TYPE_RQST = 9
    SRV_TYPE_RPLY = 10
    SA_ADVERT = 11


FLAG_OVERFLOW = 0x8000
FLAG_FRESH = 0x4000
FLAG_REQUEST_MCAST = 0x2000


@dataclass(frozen=True, slots=True)
class SlpMessage:
    """One SLPv2 message; which body fields are meaningful depends on ``function``.

    - SrvRqst: ``prlist``, ``service_type``, ``scopes``, ``predicate``.
    - AttrRqst: ``prlist``, ``url``, ``scopes``, ``tags``.
    - AttrRply: ``error_code``, ``attributes``.
    - SAAdvert: ``url``, ``scopes``, ``attributes``.
    - SrvReg: ``url`` (with ``lifetime``), ``service_type``, ``scopes``, ``attributes``.
    Other functions are decoded as a header only.
    """

    function: FunctionId
    xid: int = 0
    flags: int = 0
    language: str = "en"
    error_code: int = 0
    url: str = ""
    lifetime: int = 0
    service_type: str = ""
    scopes: str = ""
    attributes: str = ""
    predicate: str = ""
    prlist: str = ""
    tags: str = ""


class SlpDecodeError(ValueError):
    """Bytes that are not an SLPv2 message; only raised by :func:`decode_message_strict`."""


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("an SLP string is at most 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _url_entry(url: str, lifetime: int) -> bytes:
    return b"\x00" + struct.pack(">H", lifetime) + _string(url) + b"\x00"


def encode_message(message: SlpMessage) -> bytes:
    """The wire bytes of ``message``; raises ``ValueError`` for functions it cannot build."""
    fn = message.function
    if fn is FunctionId.SRV_RQST:
        body = b"".join(
            _string(s) for s in (message.prlist, message.service_type, message.scopes, message.predicate, "")
        )
    elif fn is FunctionId.ATTR_RQST:
        body = b"".join(_string(s) for s in (message.prlist, message.url, message.scopes, message.tags, ""))
    elif fn is FunctionId.ATTR_RPLY:
        body = struct.pack(">H", message.error_code) + _string(message.attributes) + b"\x00"
    elif fn is FunctionId.SA_ADVERT:
        body = _string(message.url) + _string(message.scopes) + _string(message.attributes) + b"\x00"
    elif fn is FunctionId.SRV_REG:
        body = (
            _url_entry(message.url, message.lifetime)
            + _string(message.service_type)
            + _string(message.scopes)
            + _string(message.attributes)
            + b"\x00"
        )
    else:
        raise ValueError(f"cannot build SLP function {fn.name}")
    language = message.language.encode("ascii")
    length = _HEADER.size + len(language) + len(body)
    header = _HEADER.pack(
        _VERSION,
        int(fn),
        length.to_bytes(3, "big"),
        message.flags & 0xFFFF,
        b"\x00\x00\x00",
        message.xid & 0xFFFF,
        len(language),
    )
    return header + language + body


class _Reader:
    """Reads SLP fields from a bounded buffer; every overrun is a :class:`SlpDecodeError`."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self._data = data
        self._pos = start
        self._end = end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise SlpDecodeError("field runs past the end of the message")
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def string(self) -> str:
        # Devices in the field are not strict UTF-8; keep what can be read.
        return self.take(self.u16()).decode("utf-8", errors="replace")

    def auth_blocks(self) -> None:
        for _ in range(self.u8()):
            self.take(2)  # block structure descriptor
            self.take(max(self.u16() - 4, 0))

    def trailing_auth_blocks(self) -> None:
        # Authentication is not used on these networks, and devices have been seen to end a
        # message without a valid auth-block count: what came before is complete, keep it.
        with contextlib.suppress(SlpDecodeError):
            self.auth_blocks()


def decode_message_strict(data: bytes) -> SlpMessage:
    """Decode one SLPv2 message; raises :class:`SlpDecodeError` on anything malformed."""
    if len(data) < _HEADER.size:
        raise SlpDecodeError("shorter than an SLPv2 header")
    version, function, raw_length, flags, _next_ext, xid, lang_len = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise SlpDecodeError(f"SLP version {version}, expected 2")
    try:
        fn = FunctionId(function)
    except ValueError:
        raise SlpDecodeError(f"unknown SLP function {function}") from None
    length = int.from_bytes(raw_length, "big")
    if length < _HEADER.size + lang_len or length > len(data):
        raise SlpDecodeError(f"length field {length} does not fit a {len(data)}-byte datagram")
    reader = _Reader(data, _HEADER.size, length)
    try:
        language = reader.take(lang_len).decode("ascii")
    except UnicodeDecodeError:
        raise SlpDecodeError("language tag is not ASCII") from None
    base = SlpMessage(function=fn, xid=xid, flags=flags, language=language)
    if fn is FunctionId.SRV_RQST:
        prlist, service_type, scopes, predicate = (reader.string() for _ in range(4))
        return dataclasses.replace(
            base, prlist=prlist, service_type=service_type, scopes=scopes, predicate=predicate
        )
    if fn is FunctionId.ATTR_RQST:
        prlist, url, scopes, tags = (reader.string() for _ in range(4))
        return dataclasses.replace(base, prlist=prlist, url=url, scopes=scopes, tags=tags)
    if fn is FunctionId.ATTR_RPLY:
        error_code = reader.u16()
        attributes = reader.string()
        reader.trailing_auth_blocks()
        return dataclasses.replace(base, error_code=error_code, attributes=attributes)
    if fn is FunctionId.SA_ADVERT:
        url, scopes, attributes = (reader.string() for _ in range(3))
        reader.trailing_auth_blocks()
        return dataclasses.replace(base, url=url, scopes=scopes, attributes=attributes)
    if fn is FunctionId.SRV_REG:
        reader.u8()  # reserved
        lifetime = reader.u16()
        url = reader.string()
        reader.auth_blocks()
        service_type, scopes, attributes = (reader.string() for _ in range(3))
        return dataclasses.replace(
            base, url=url, lifetime=lifetime, service_type=service_type, scopes=scopes, attributes=attributes
        )
    return base


def decode_message(data: bytes) -> SlpMessage | None:
    """Decode one SLPv2 message, or ``None`` for junk; never raises."""
    try:
        return decode_message_strict(data)
    except SlpDecodeError:
        return None


def parse_attributes(text: str) -> dict[str, str]:
    """An SLP attribute list ``(tag=value),(tag),...`` as a dict (keyword tags map to ``""``).

    Tags are lower-cased; values keep their case. Text outside parentheses is ignored, so a
    list cut short or padded with junk still yields what it holds; never raises.
    """
    attributes: dict[str, str] = {}
    depth = 0
    start = 0
    for index, char in enumerate(text):
        if char == "(":
            if depth == 0:
                start = index + 1
            depth += 1
        elif char == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                tag, _, value = text[start:index].partition("=")
                if tag.strip():
                    attributes[tag.strip().lower()] = value.strip()
    return attributes


def dcid_from_attributes(attributes: dict[str, str]) -> str | None:
    """The DCID in ``csl-esta.dmp`` (``cd:`` and, as some devices send, ``d:``), upper case."""
    dmp = attributes.get("csl-esta.dmp")
    if dmp is None:
        return None
    match = _DCID_IN_DMP.search(dmp)
    return None if match is None else match.group(1).upper()


def found_from_attributes(attributes: dict[str, str], address: str) -> FoundDevice | None:
    """What an SLP attribute list sent from ``address`` says about a device, or ``None``."""
    dcid = dcid_from_attributes(attributes)
    model = attributes.get("acn-fctn") or None
    if dcid is None and model is None:
        return None
    entry = None if dcid is None else lookup_dcid(dcid)
    if entry is not None:
        model, family = entry.model, entry.family
        vendor: Vendor | None = entry.vendor
    else:
        family = family_for_model(model)
        vendor = vendor_for_model(model)
        if vendor is None and dcid is not None and is_shure_dcid(dcid):
            vendor = Vendor.SHURE
    port = SHURE_CONTROL_PORT
    raw_port = attributes.get(CONTROL_PORT_TAG, "")
    if raw_port.isdigit() and 0 < int(raw_port) <= 0xFFFF:
        port = int(raw_port)
    cid = normalize_dcid(attributes.get("cid", ""))
    return FoundDevice(
        source="slp",
        address=address,
        port=port,
        vendor=vendor,
        family=family,
        model=None if model is None else model[:_MAX_TEXT],
        device_id=cid,
        name=attributes.get("acn-uacn", "")[:_MAX_TEXT] or None,
        supported=family is not None,
    )


def build_attributes(
    dcid: str,
    *,
    cid: str,
    address: str,
    model: str | None = None,
    name: str | None = None,
    control_port: int = SHURE_CONTROL_PORT,
) -> str:
    """The attribute list a Shure receiver announces (``control_port`` added only when not 2202)."""
    parts = [f"(cid={cid.upper()})"]
    if model:
        parts.append(f"(acn-fctn={model})")
    if name:
        parts.append(f"(acn-uacn={name})")
    parts.append("(acn-services=esta.dmp)")
    parts.append(f"(csl-esta.dmp=esta.sdt/{address}:57383;esta.dmp/cd:{dcid.upper()})")
    parts.append(f"(device-description=$:tftp://{address}/$.ddl)")
    if control_port != SHURE_CONTROL_PORT:
        parts.append(f"({CONTROL_PORT_TAG}={control_port})")
    return ",".join(parts)


def _check_ipv4(addresses: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(addresses)
    if not checked:
        raise ConfigError("SLP needs at least one interface address")
    for address in checked:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ConfigError(f"SLP interface {address!r} is not an IPv4 address") from None
    return checked


def _group_socket(group: str, port: int, interfaces: Sequence[str]) -> socket.socket:
    """A socket receiving ``group:port``, joined on exactly ``interfaces``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            # Several listeners and simulators on one host share the well-known port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Binding to the group (not 0.0.0.0) keeps unicast traffic to 8427 and other groups out.
        sock.bind((group, port))
        for interface in interfaces:
            membership = socket.inet_aton(group) + socket.inet_aton(interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _sender_socket(interface: str) -> socket.socket:
    """A socket that sends to multicast groups on ``interface`` only, and hears unicast replies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.bind((interface, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Datagrams(asyncio.DatagramProtocol):
    """Hands every datagram of one endpoint to a callback."""

    def __init__(self, handler: Callable[[bytes, tuple[str, int], asyncio.DatagramTransport], None]) -> None:
        self._handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport on 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if self.transport is not None:
            self._handler(data, (str(addr[0]), int(addr[1])), self.transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on UDP (port unreachable after a unicast reply) are not fatal.
        logger.debug("slp socket error", extra={"error": str(exc)})


async def _endpoint(
    sock: socket.socket, handler: Callable[[bytes, tuple[str, int], asyncio.DatagramTransport], None]
) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(handler), sock=sock)
    return transport


@dataclass(slots=True)
class SlpStats:
    """Counters of an SLP listener."""

    datagrams: int = 0
    malformed: int = 0
    ignored: int = 0
    found: int = 0
    probes: int = 0


@dataclass(slots=True)
class _Endpoints:
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()


class SlpListener:
    """Listens for Shure SLP announcements on the configured interfaces and reports devices.

    ``on_found`` is called in the event loop for every datagram that names a device. A
    :meth:`probe` multicasts a service request so that devices answer now instead of at their
    next periodic announcement; their unicast answers are heard on the probe sockets.
    """

    def __init__(
        self,
        on_found: Callable[[FoundDevice], None],
        *,
        interfaces: Iterable[str] = ("127.0.0.1",),
        group: str = SLP_GROUP,
        port: int = SLP_PORT,
    ) -> None:
        self._on_found = on_found
        self.interfaces = _check_ipv4(interfaces)
        self.group = group
        self.port = port
        self.stats = SlpStats()
        self._endpoints = _Endpoints()
        self._senders: list[asyncio.DatagramTransport] = []

    @property
    def running(self) -> bool:
        """Whether the listener's sockets are open."""
        return bool(self._endpoints.transports)

    async def start(self) -> None:
        """Open the group socket and one probe socket per interface."""
        if self.running:
            return
        try:
            group_sock = _group_socket(self.group, self.port, self.interfaces)
            self._endpoints.transports.append(await _endpoint(group_sock, self._datagram))
            for interface in self.interfaces:
                transport = await _endpoint(_sender_socket(interface), self._datagram)
                self._endpoints.transports.append(transport)
                self._senders.append(transport)
        except BaseException:
            await self.close()
            raise
        logger.info(
            "slp listening",
            extra={"group": self.group, "port": self.port, "interfaces": ",".join(self.interfaces)},
        )

    def probe(self) -> None:
        """Ask every device on the configured interfaces to announce itself now."""
        request = SlpMessage(
            FunctionId.SRV_RQST,
            xid=random.getrandbits(16),  # nosec B311  # SLP transaction id, not security
            flags=FLAG_REQUEST_MCAST,
            service_type=ACN_SERVICE_TYPE,
            scopes="ACN-DEFAULT",
        )
        data = encode_message(request)
        for transport in self._senders:
            transport.sendto(data, (self.group, self.port))
            self.stats.probes += 1

    async def close(self) -> None:
        """Close every socket; safe to call twice."""
        self._endpoints.close()
        self._senders.clear()

    def _datagram(self, data: bytes, addr: tuple[str, int], _transport: asyncio.DatagramTransport) -> None:
        self.stats.datagrams += 1
        message = decode_message(data[:_MAX_DATAGRAM])
        if message is None:
            self.stats.malformed += 1
            logger.debug("slp malformed datagram", extra={"peer": addr[0], "size": len(data)})
            return
        if message.function not in (FunctionId.ATTR_RPLY, FunctionId.SA_ADVERT, FunctionId.SRV_REG):
            self.stats.ignored += 1
            return
        found = found_from_attributes(parse_attributes(message.attributes), addr[0])
        if found is None:
            self.stats.ignored += 1
            return
        self.stats.found += 1
        self._on_found(found)


class SlpAnnouncer:
    """Announces one simulated Shure receiver over SLP, as the hardware does.

    It multicasts an Attribute Reply every ``interval_s`` and answers service and attribute
    requests at once, unicast to the asker. It sends on ``interface`` only (loopback unless a
    caller says otherwise).
    """

    def __init__(
        self,
        dcid: str,
        *,
        device_id: str,
        model: str | None = None,
        name: str | None = None,
        control_port: int = SHURE_CONTROL_PORT,
        interface: str = "127.0.0.1",
        interval_s: float = 5.0,
        group: str = SLP_GROUP,
        port: int = SLP_PORT,
    ) -> None:
        normalized = normalize_dcid(dcid)
        if normalized is None:
            raise ValueError(f"DCID {dcid!r} is not a UUID")
        self.dcid = normalized
        # ACN component ids are UUIDs; a simulator's device id of any shape maps to a stable one.
        self.cid = normalize_dcid(device_id) or str(uuid.uuid5(uuid.NAMESPACE_OID, device_id)).upper()
        self.model = model if model is not None else _model_of(normalized)
        self.name = name
        self.control_port = control_port
        self.interface = _check_ipv4((interface,))[0]
        self.interval_s = interval_s
        self.group = group
        self.port = port
        self.sent = 0
        self._endpoints = _Endpoints()
        self._sender: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_announcement(
        cls,
        announcement: Announcement,
        *,
        device_id: str,
        interface: str = "127.0.0.1",
        interval_s: float = 5.0,
    ) -> SlpAnnouncer | None:
        """The announcer of a simulator's :class:`Announcement`, or ``None`` if it has no SLP DCID."""
        if announcement.slp_dcid is None:
            return None
        return cls(
            announcement.slp_dcid,
            device_id=device_id,
            model=announcement.properties.get("model"),
            name=announcement.instance_name,
            control_port=announcement.port,
            interface=interface,
            interval_s=interval_s,
        )

    def attribute_reply(self, xid: int = 0) -> bytes:
        """The Attribute Reply datagram this announcer sends."""
        attributes = build_attributes(
            self.dcid,
            cid=self.cid,
            address=self.interface,
            model=self.model,
            name=self.name,
            control_port=self.control_port,
        )
        return encode_message(SlpMessage(FunctionId.ATTR_RPLY, xid=xid, attributes=attributes))

    async def start(self) -> None:
        """Open the sockets and start announcing periodically."""
        if self._task is not None:
            return
        try:
            group_sock = _group_socket(self.group, self.port, (self.interface,))
            self._endpoints.transports.append(await _endpoint(group_sock, self._request))
            self._sender = await _endpoint(_sender_socket(self.interface), self._request)
            self._endpoints.transports.append(self._sender)
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._announce_forever(), name=f"slp-announce-{self.cid}")

    def announce(self) -> None:
        """Multicast the attribute reply once, now."""
        if self._sender is not None:
            self._sender.sendto(self.attribute_reply(), (self.group, self.port))
            self.sent += 1

    async def close(self) -> None:
        """Stop announcing and close the sockets; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._endpoints.close()
        self._sender = None

    async def _announce_forever(self) -> None:
        while True:
            self.announce()
            await asyncio.sleep(self.interval_s)

    def _request(self, data: bytes, addr: tuple[str, int], _transport: asyncio.DatagramTransport) -> None:
        message = decode_message(data)
        if message is None or self._sender is None:
            return
        wanted = message.function is FunctionId.ATTR_RQST or (
            message.function is FunctionId.SRV_RQST and message.service_type.lower() in ("", ACN_SERVICE_TYPE)
        )
        if wanted:
            self._sender.sendto(self.attribute_reply(message.xid), addr)
            self.sent += 1


def _model_of(dcid: str) -> str | None:
    entry = lookup_dcid(dcid)
    return None if entry is None else entry.model
