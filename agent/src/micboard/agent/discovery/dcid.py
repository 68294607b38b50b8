"""What a discovered name or id says about a device: the shipped Shure DCID table and the
model-name rules that map DNS-SD TXT ``model=`` / SSC ``product`` values to a family."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from micboard.shared.model import Family, Vendor

SHURE_CONTROL_PORT = 2202
"""TCP port of the Shure command-string protocol."""

SSC_PORT = 45
"""UDP port of Sennheiser Sound Control v1."""

# Every Shure DCID seen so far ends in this node id; it lets an SLP reply with a DCID
# missing from the table still be attributed to Shure rather than to "unknown vendor".
_SHURE_DCID_SUFFIX = "-0015C5F3F612"

_UUID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")


@dataclass(frozen=True, slots=True)
class DcidEntry:
    """A device class a DCID stands for; ``family`` is ``None`` when known but not supported."""

    model: str
    family: Family | None
    channels: int
    vendor: Vendor = Vendor.SHURE

    @property
    def supported(self) -> bool:
        """Whether micboard has a driver for this device class."""
        return self.family is not None


SHURE_DCIDS: Mapping[str, DcidEntry] = MappingProxyType(
    {
        "040688F8-FD5A-11E3-81EF-0015C5F3F612": DcidEntry("ULXD4", Family.ULXD, 1),
        "0406C584-FD5A-11E3-AD62-0015C5F3F612": DcidEntry("ULXD4D", Family.ULXD, 2),
        "0407257E-FD5A-11E3-A21F-0015C5F3F612": DcidEntry("ULXD4Q", Family.ULXD, 4),
        "0405BFCC-FD5A-11E3-BEEE-0015C5F3F612": DcidEntry("QLXD4", Family.QLXD, 1),
        "042D1C02-FD5A-11E3-B298-0015C5F3F612": DcidEntry("AD4D", Family.AXIENT, 2),
        "042D5A00-FD5A-11E3-A553-0015C5F3F612": DcidEntry("AD4Q", Family.AXIENT, 4),
        "CCB8DB5C-E139-11DF-8A4C-0015C5F3F612": DcidEntry("UR4D", None, 2),
        "041382D8-FD5A-11E3-A8AA-0015C5F3F612": DcidEntry("PSM1000", None, 2),
    }
)
"""Shure device class ids (from SLP ``csl-esta.dmp ... cd:<DCID>``) -> device class."""

# Prefixes of the normalized model name (upper case, letters and digits only), longest
# match wins. Families without a driver map to None so that they are reported, not adopted.
_MODEL_PREFIXES: tuple[tuple[str, Family | None, Vendor], ...] = (
    ("ULXD4", Family.ULXD, Vendor.SHURE),
    ("QLXD4", Family.QLXD, Vendor.SHURE),
    ("SLXD4", Family.SLXD, Vendor.SHURE),
    ("AD4", Family.AXIENT, Vendor.SHURE),
    ("UR4", None, Vendor.SHURE),
    ("P10T", None, Vendor.SHURE),
    ("PSM1000", None, Vendor.SHURE),
    ("EWDXEM", Family.EWDX, Vendor.SENNHEISER),
    ("EM6000", Family.D6000, Vendor.SENNHEISER),
    ("EM9000", None, Vendor.SENNHEISER),
    ("SLMCR", None, Vendor.SENNHEISER),
)

_FAMILY_VENDOR: Mapping[Family, Vendor] = MappingProxyType(
    {
        Family.ULXD: Vendor.SHURE,
        Family.QLXD: Vendor.SHURE,
        Family.AXIENT: Vendor.SHURE,
        Family.SLXD: Vendor.SHURE,
        Family.EWDX: Vendor.SENNHEISER,
        Family.D6000: Vendor.SENNHEISER,
    }
)


def normalize_dcid(text: str) -> str | None:
    """``text`` as an upper-case DCID, or ``None`` when it is not a UUID."""
    candidate = text.strip().upper()
    return candidate if _UUID.match(candidate) else None


def lookup_dcid(dcid: str) -> DcidEntry | None:
    """The device class of a DCID (any case), or ``None`` when it is not in the table."""
    normalized = normalize_dcid(dcid)
    return None if normalized is None else SHURE_DCIDS.get(normalized)


def is_shure_dcid(dcid: str) -> bool:
    """Whether a DCID, known or not, carries Shure's node id."""
    normalized = normalize_dcid(dcid)
    return normalized is not None and normalized.endswith(_SHURE_DCID_SUFFIX)


def _match_model(model: str) -> tuple[Family | None, Vendor] | None:
    key = re.sub(r"[^A-Z0-9]", "", model.upper())
    best: tuple[str, Family | None, Vendor] | None = None
    for prefix, family, vendor in _MODEL_PREFIXES:
        if key.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, family, vendor)
    return None if best is None else (best[1], best[2])


def family_for_model(model: str | None) -> Family | None:
    """The family of a model name such as ``ULXD4Q``, ``AD4Q-A``, ``EW-DX EM 4``, ``EM 6000``."""
    if not model:
        return None
    match = _match_model(model)
    return None if match is None else match[0]


def vendor_for_model(model: str | None) -> Vendor | None:
    """The vendor of a model name, also for models micboard knows but does not drive."""
    if not model:
        return None
    match = _match_model(model)
    return None if match is None else match[1]


def vendor_for_family(family: Family) -> Vendor:
    """Who makes the receivers of ``family``."""
    return _FAMILY_VENDOR[family]


def default_port(family: Family) -> int:
    """The control port receivers of ``family`` listen on out of the box."""
    return SSC_PORT if vendor_for_family(family) is Vendor.SENNHEISER else SHURE_CONTROL_PORT
