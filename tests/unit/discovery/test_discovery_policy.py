"""Adoption policy by CIDR, the registry's merging of sightings, and static devices."""

from __future__ import annotations

import dataclasses

import pytest

from micboard.agent.discovery.found import Change, DiscoveryRegistry, FoundDevice
from micboard.agent.discovery.mdns import found_from_service, instance_label
from micboard.agent.discovery.policy import AdoptionPolicy
from micboard.agent.discovery.static import StaticDevice, static_devices
from micboard.shared.envelope import DiscoveredBody
from micboard.shared.errors import ConfigError
from micboard.shared.model import Family, Vendor

ULXD = FoundDevice(
    source="slp",
    address="10.0.0.20",
    port=2202,
    vendor=Vendor.SHURE,
    family=Family.ULXD,
    model="ULXD4Q",
    device_id="AAAA0000-0000-0000-0000-000000000001",
    supported=True,
)


def test_default_policy_adopts_every_supported_device() -> None:
    policy = AdoptionPolicy()
    assert policy.adopts(ULXD)
    assert not policy.adopts(dataclasses.replace(ULXD, family=None, supported=False))
    assert policy.allows_address("rack-a.local")


@pytest.mark.parametrize(
    ("address", "adopted"),
    [
        ("10.0.0.20", True),
        ("10.0.9.1", False),  # denied inside the allowed network
        ("10.0.9.0", False),
        ("192.168.1.5", False),  # outside the allow list
        ("192.168.2.7", True),  # a single host is a /32
        ("fe80::1%eth0", False),
        ("2001:db8::5", True),
        ("rack-a.local", False),  # a name matches no network while there is an allow list
    ],
)
def test_allow_and_deny(address: str, adopted: bool) -> None:
    policy = AdoptionPolicy.from_cidrs(
        allow=["10.0.0.0/16", "192.168.2.7", "2001:db8::/32"], deny=[" 10.0.9.0/24", "10.0.9.0"]
    )
    assert policy.adopts(dataclasses.replace(ULXD, address=address)) is adopted


def test_deny_only_policy_and_bad_cidrs() -> None:
    policy = AdoptionPolicy.from_cidrs(deny=["192.0.2.0/24"])
    assert not policy.allows_address("192.0.2.9")
    assert policy.allows_address("198.51.100.1")
    assert policy.allows_address("printer.local")
    with pytest.raises(ConfigError, match="allow entry 'not-a-net'"):
        AdoptionPolicy.from_cidrs(allow=["not-a-net"])
    with pytest.raises(ConfigError, match="deny entry"):
        AdoptionPolicy.from_cidrs(deny=["10.0.0.0/33"])


def test_registry_recognises_a_device_that_changed_address() -> None:
    registry = DiscoveryRegistry()
    assert registry.observe(ULXD).change is Change.NEW
    assert registry.observe(ULXD).change is Change.UNCHANGED
    moved = dataclasses.replace(ULXD, address="10.0.0.77", model=None)
    sighting = registry.observe(moved)
    assert sighting.change is Change.MOVED
    assert sighting.previous == ULXD
    assert sighting.device.address == "10.0.0.77"
    assert sighting.device.model == "ULXD4Q"  # a source that does not know the model keeps it
    assert len(registry) == 1
    assert registry.get(ULXD.identity) == sighting.device


def test_registry_reports_changes_and_keeps_different_ids_apart() -> None:
    registry = DiscoveryRegistry()
    registry.observe(ULXD)
    renamed = registry.observe(dataclasses.replace(ULXD, name="Rack A", source="mdns"))
    assert renamed.change is Change.CHANGED
    assert renamed.device.source == "mdns"
    # Another device took over the address (DHCP): a second device, not a move.
    other = dataclasses.replace(ULXD, device_id="BBBB0000-0000-0000-0000-000000000002")
    assert registry.observe(other).change is Change.NEW
    assert len(registry) == 2
    registry.clear()
    assert len(registry) == 0 and registry.devices() == []


def test_registry_joins_id_less_sightings_by_endpoint() -> None:
    registry = DiscoveryRegistry()
    anonymous = FoundDevice(
        source="mdns",
        address="10.0.0.20",
        port=2202,
        vendor=Vendor.SHURE,
        model="ULXD4Q",
        family=Family.ULXD,
        supported=True,
    )
    assert anonymous.identity == "at:10.0.0.20:2202"
    assert registry.observe(anonymous).change is Change.NEW
    # The same device now seen with its id: it takes over the id-less entry.
    upgraded = registry.observe(dataclasses.replace(ULXD, model=None))
    assert upgraded.change is Change.CHANGED  # its id is news worth publishing
    assert upgraded.device.identity == ULXD.identity
    assert registry.get(anonymous.identity) is None
    # An id-less sighting at its endpoint is that device again.
    again = registry.observe(dataclasses.replace(anonymous, name="Rack A"))
    assert again.change is Change.CHANGED
    assert again.device.device_id == ULXD.device_id
    # A device of another vendor at the same endpoint is not merged into it.
    foreign = dataclasses.replace(anonymous, vendor=Vendor.SENNHEISER)
    assert registry.observe(foreign).change is Change.NEW
    assert [d.vendor for d in registry.devices()] == [Vendor.SENNHEISER, Vendor.SHURE]
    assert FoundDevice(source="slp", address="10.0.0.1").identity == "at:10.0.0.1:-"


def test_merge_marks_a_device_supported_once_its_family_is_known() -> None:
    registry = DiscoveryRegistry()
    registry.observe(ULXD)
    sighting = registry.observe(dataclasses.replace(ULXD, family=None, supported=False, model=None))
    assert sighting.device.family is Family.ULXD and sighting.device.supported
    assert sighting.change is Change.UNCHANGED


def test_to_body() -> None:
    body = ULXD.to_body()
    assert isinstance(body, DiscoveredBody)
    assert body.model_dump() == {
        "source": "slp",
        "address": "10.0.0.20",
        "port": 2202,
        "vendor": "shure",
        "family": "ulxd",
        "model": "ULXD4Q",
        "device_id": ULXD.device_id,
        "name": None,
        "supported": True,
    }
    bare = FoundDevice(source="static", address="10.0.0.1").to_body()
    assert bare.vendor is None and bare.family is None and not bare.supported


def test_static_devices() -> None:
    entries = static_devices(
        [
            {"address": " 10.0.0.30 ", "family": "EWDX", "name": "Stage left"},
            {"address": "10.0.0.31", "family": "axient", "port": 2203},
            StaticDevice("10.0.0.32", Family.QLXD),
        ]
    )
    found = [e.to_found() for e in entries]
    assert [(f.address, f.port, f.vendor, f.family, f.name) for f in found] == [
        ("10.0.0.30", 45, Vendor.SENNHEISER, Family.EWDX, "Stage left"),
        ("10.0.0.31", 2203, Vendor.SHURE, Family.AXIENT, None),
        ("10.0.0.32", 2202, Vendor.SHURE, Family.QLXD, None),
    ]
    assert all(f.supported and f.source == "static" for f in found)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"family": "ulxd"}, "needs an address"),
        ({"address": " ", "family": "ulxd"}, "needs an address"),
        ({"address": "10.0.0.1", "family": "uhfr"}, "family must be one of"),
        ({"address": "10.0.0.1", "family": "ulxd", "port": "2202"}, "port must be an integer"),
        ({"address": "10.0.0.1", "family": "ulxd", "port": True}, "port must be an integer"),
        ({"address": "10.0.0.1", "family": "ulxd", "port": 70000}, "not 1..65535"),
        ({"address": "10.0.0.1", "family": "ulxd", "name": 5}, "name must be text"),
        ({"address": "10.0.0.1", "family": "ulxd", "ip": "x"}, "unknown keys"),
    ],
)
def test_static_config_errors(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StaticDevice.from_mapping(entry)


def test_found_from_service_mapping() -> None:
    shure = found_from_service(
        "_shure._tcp.local.",
        "Rack 1._shure._tcp.local.",
        port=2202,
        addresses=["fe80::1%2", "10.0.0.40"],
        properties={b"Model": b"ULXD4Q", b"serial": b"  ", b"other": None},
    )
    assert shure is not None
    assert (shure.address, shure.vendor, shure.family, shure.model, shure.name, shure.device_id) == (
        "10.0.0.40",
        Vendor.SHURE,
        Family.ULXD,
        "ULXD4Q",
        "Rack 1",
        None,
    )
    ssc = found_from_service(
        "_ssc._udp.local.",
        "EM4 Stage._ssc._udp.local.",
        port=45,
        addresses=["10.0.0.41"],
        properties={b"product": b"EW-DX EM 4", b"serial": b"1234567890"},
    )
    assert ssc is not None
    assert (ssc.vendor, ssc.family, ssc.model, ssc.device_id, ssc.supported) == (
        Vendor.SENNHEISER,
        Family.EWDX,
        "EW-DX EM 4",
        "1234567890",
        True,
    )
    other = found_from_service(
        "_http._tcp.local.",
        "x._http._tcp.local.",
        port=0,
        addresses=["10.0.0.9"],
        properties={b"model": b"EM 6000"},
    )
    assert other is not None and other.vendor is Vendor.SENNHEISER and other.port is None
    assert (
        found_from_service("_ssc._udp.local.", "y._ssc._udp.local.", port=45, addresses=[], properties={})
        is None
    )
    assert instance_label("_ssc._udp.local.", "odd-name") == "odd-name"
