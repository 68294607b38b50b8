"""Sennheiser Sound Control Protocol v1: JSON trees over UDP, one object per datagram.

A query is the tree with ``null`` leaves, a set puts a value in the leaf, and the device answers
with the same tree filled in. ``osc.xid`` correlates a reply with its request and ``osc.error``
carries inline error trees with HTTP-like codes. Decoding never raises: a datagram that is not
one bounded UTF-8 JSON object comes back as :class:`SscRejected`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

SSC_PORT = 45
SSC_SERVICE_TYPE = "_ssc._udp.local."
MAX_DATAGRAM_BYTES = 65_507  # the largest UDP payload over IPv4
MAX_DEPTH = 32
MAX_ERRORS = 64
MAX_XID_CHARS = 64

Tree = dict[str, Any]


class SscStatus(IntEnum):
    """The HTTP-like codes of ``osc.error`` leaves."""

    BAD_REQUEST = 400
    NOT_FOUND = 404
    NOT_ACCEPTABLE = 406
    CONFLICT = 409
    LOCKED = 423
    FAILED_DEPENDENCY = 424
    PARAMETER_NOT_FOUND = 454
    INTERNAL_ERROR = 500
    NOT_IMPLEMENTED = 501


@dataclass(frozen=True, slots=True)
class SscError:
    """One inline error: the address it is about, its code and the device's description."""

    path: tuple[str, ...]
    code: int
    desc: str | None = None

    @property
    def status(self) -> SscStatus | None:
        """The code as a known :class:`SscStatus`, or ``None`` for a code outside the protocol."""
        try:
            return SscStatus(self.code)
        except ValueError:
            return None

    @property
    def address(self) -> str:
        """The address as the protocol writes it, e.g. ``/rx1/name``."""
        return "/" + "/".join(self.path)

    def within(self, *prefix: str) -> bool:
        """Whether the error is about ``prefix`` or an address below it."""
        return self.path[: len(prefix)] == prefix

    def describe(self) -> str:
        """A one-line human text: code, meaning, address and the device's description."""
        status = self.status
        meaning = status.name.lower().replace("_", " ") if status is not None else "unknown error"
        text = f"{self.code} {meaning} at {self.address}"
        return f"{text}: {self.desc}" if self.desc else text


@dataclass(frozen=True, slots=True)
class SscMessage:
    """A decoded datagram: the tree without ``osc.xid``/``osc.error``, the xid and the errors."""

    tree: Tree
    xid: int | str | None = None
    errors: tuple[SscError, ...] = ()

    def lookup(self, *path: str) -> Any:
        """The value at ``path``, or ``None`` when it is missing (or ``null``)."""
        node: Any = self.tree
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    def node(self, *path: str) -> Tree | None:
        """The object at ``path``, or ``None`` when it is missing or not an object."""
        value = self.lookup(*path)
        return value if isinstance(value, dict) else None

    def contains(self, *path: str) -> bool:
        """Whether ``path`` is present in the tree (even with a ``null`` value)."""
        node: Any = self.tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    @property
    def addresses(self) -> frozenset[str]:
        """The top-level addresses this message is about, from its tree and its errors."""
        keys = {key for key in self.tree if key != "osc"}
        keys.update(error.path[0] for error in self.errors if error.path)
        return frozenset(keys)


@dataclass(frozen=True, slots=True)
class SscRejected:
    """A datagram that could not be decoded, and why (for logs and counters)."""

    reason: str


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would let a sentinel reach the model.
    raise ValueError(f"non-standard JSON constant {name}")


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_errors(value: Any) -> tuple[SscError, ...]:
    """Flatten an ``osc.error`` value into typed errors; never raises.

    The documented form is a list of trees whose leaves are ``[{"desc": ..., "code": 404}]``;
    the form seen on some firmware, ``[404, {"desc": ...}]``, is accepted too.
    """
    found: list[SscError] = []
    _collect_errors(value, (), found)
    return tuple(found)


def _collect_errors(node: Any, path: tuple[str, ...], found: list[SscError]) -> None:
    if len(found) >= MAX_ERRORS or len(path) > MAX_DEPTH:
        return
    if _is_int(node):
        found.append(SscError(path, node))
    elif isinstance(node, list):
        descs = [item.get("desc") for item in node if isinstance(item, dict)]
        descs = [desc for desc in descs if isinstance(desc, str)]
        for item in node:
            if _is_int(item):
                found.append(SscError(path, item, descs[0] if descs else None))
            elif isinstance(item, dict | list):
                _collect_errors(item, path, found)
    elif isinstance(node, dict):
        code = node.get("code")
        if isinstance(code, int) and not isinstance(code, bool):
            desc = node.get("desc")
            found.append(SscError(path, code, desc if isinstance(desc, str) else None))
            return
        for key, child in node.items():
            if key != "desc":
                _collect_errors(child, (*path, key), found)


def decode_datagram(data: bytes, *, max_bytes: int = MAX_DATAGRAM_BYTES) -> SscMessage | SscRejected:
    """Decode one datagram into a :class:`SscMessage`; any malformed input gives :class:`SscRejected`."""
    if len(data) > max_bytes:
        return SscRejected(f"datagram of {len(data)} bytes exceeds {max_bytes}")
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return SscRejected("not UTF-8")
    except RecursionError:
        return SscRejected("nested too deeply")
    except ValueError as exc:
        return SscRejected(f"not JSON: {str(exc)[:80]}")
    if not isinstance(value, dict):
        return SscRejected(f"top level is {type(value).__name__}, not an object")
    if _depth(value) > MAX_DEPTH:
        return SscRejected(f"nested deeper than {MAX_DEPTH}")
    return _message(value)


def _message(value: Tree) -> SscMessage:
    xid: int | str | None = None
    errors: tuple[SscError, ...] = ()
    osc = value.get("osc")
    if isinstance(osc, dict):
        rest = dict(osc)
        raw_xid = rest.pop("xid", None)
        if _is_int(raw_xid) or (isinstance(raw_xid, str) and len(raw_xid) <= MAX_XID_CHARS):
            xid = raw_xid
        if "error" in rest:
            errors = parse_errors(rest.pop("error"))
        tree = {key: item for key, item in value.items() if key != "osc"}
        if rest:
            tree["osc"] = rest
        return SscMessage(tree, xid, errors)
    return SscMessage(value, None, ())


def encode_message(tree: Mapping[str, Any], *, xid: int | str | None = None) -> bytes:
    """Encode ``tree`` as one compact UTF-8 datagram, adding ``osc.xid`` when given."""
    body: Tree = dict(tree)
    if xid is not None:
        osc = body.get("osc")
        body["osc"] = {**(osc if isinstance(osc, dict) else {}), "xid": xid}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def error_tree(path: Iterable[str], code: int, desc: str) -> Any:
    """The documented error tree for one address: ``{"rx1":{"name":[{"desc":..,"code":..}]}}``."""
    node: Any = [{"desc": desc, "code": code}]
    for key in reversed(tuple(path)):
        node = {key: node}
    return node


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (not a bool) with a finite value."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Queries and sets the driver sends. Each returns a fresh tree so callers may extend it.

RX_FIELDS = ("name", "frequency", "mute", "gain", "warnings")
METER_FIELDS = ("rssi", "rsqi", "divi", "af")


def identity_query() -> Tree:
    """Product, serial, firmware version and device name."""
    return {"device": {"identity": {"product": None, "serial": None, "version": None}, "name": None}}


def liveness_query() -> Tree:
    """The cheap query controllers poll to know the device is there."""
    return {"device": {"name": None}}


def channel_query(channel: int) -> Tree:
    """The configuration and warnings of receive channel ``channel``."""
    return {f"rx{channel}": dict.fromkeys(RX_FIELDS)}


def mate_query(channel: int) -> Tree:
    """The transmitter linked to ``channel``; answered with 424 when it is switched off."""
    return {
        "mates": {
            f"tx{channel}": {
                "battery": {"gauge": None, "lifetime": None, "type": None},
                "name": None,
                "mute": None,
                "type": None,
                "trim": None,
                "warnings": None,
            }
        }
    }


#: The longest interval a meter subscription asks for ("max"): a push at least this often.
METER_MAX_MS = 10_000


def meter_subscription(
    channels: Iterable[int], *, lifetime_s: float, min_ms: int, max_ms: int = METER_MAX_MS, count: int = 1000
) -> Tree:
    """Subscribe to the meters of ``channels`` for ``lifetime_s`` seconds (renew before it ends)."""
    lifetime: int | float = int(lifetime_s) if float(lifetime_s).is_integer() else lifetime_s
    params = {"lifetime": lifetime, "min": min_ms, "max": max_ms, "count": count}
    meters = {f"rx{channel}": dict.fromkeys(METER_FIELDS) for channel in channels}
    return {"osc": {"state": {"subscribe": [{"#": params, "m": meters}]}}}


def cancel_subscriptions() -> Tree:
    """Cancel every subscription of this controller."""
    return {"osc": {"state": {"subscribe": [{"#": {"cancel": True}}]}}}


def rename_set(channel: int, name: str) -> Tree:
    """Set the name of receive channel ``channel``."""
    return {f"rx{channel}": {"name": name}}


def mute_set(channel: int, muted: bool) -> Tree:
    """Mute or unmute the audio output of receive channel ``channel``."""
    return {f"rx{channel}": {"mute": muted}}


def identify_set() -> Tree:
    """Make the device flash its display so it can be found in the rack."""
    return {"device": {"identification": {"visual": True}}}
