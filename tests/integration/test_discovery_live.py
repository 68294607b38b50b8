"""Discovery against real sockets on loopback: zeroconf on 127.0.0.1, SLP multicast on lo."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from micboard.agent.discovery import (
    SHURE_SERVICE,
    SSC_UDP_SERVICE,
    AdoptionPolicy,
    DiscoveryConfig,
    DiscoveryService,
    FoundDevice,
    MdnsAnnouncer,
    MdnsBrowser,
    SlpAnnouncer,
    SlpListener,
    StaticDevice,
)
from micboard.agent.discovery.slp import SLP_GROUP, SLP_PORT, FunctionId, SlpMessage, encode_message
from micboard.agent.drivers.simulation import Announcement
from micboard.shared.model import Family, Vendor

AD4Q = "042D5A00-FD5A-11E3-A553-0015C5F3F612"
ULXD4D = "0406C584-FD5A-11E3-AD62-0015C5F3F612"
UR4D = "CCB8DB5C-E139-11DF-8A4C-0015C5F3F612"


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves a task or a thread behind."""
    threads = set(threading.enumerate())
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert leaked == []
    assert set(threading.enumerate()) - threads == set()


def unique(prefix: str) -> str:
    # Other test runs on this host may announce on the same loopback groups at the same time.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 8.0) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling: the conditions are counters and lists filled by the code under test.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_mdns_announcer_and_browser_on_loopback() -> None:
    shure_name, ssc_name = unique("Rack ULXD"), unique("EM4 Stage")
    shure = Announcement(SHURE_SERVICE, shure_name, 42202, {"model": "ULXD4Q"})
    ssc = Announcement(SSC_UDP_SERVICE, ssc_name, 40045, {"product": "EW-DX EM 4", "serial": ssc_name})
    found: dict[str, FoundDevice] = {}
    announcer = MdnsAnnouncer([shure, ssc], interfaces=["127.0.0.1"])
    browser = MdnsBrowser(lambda f: found.__setitem__(f.name or "", f), interfaces=["127.0.0.1"])
    try:
        await announcer.start()
        assert sorted(announcer.names) == sorted(
            [f"{shure_name}.{SHURE_SERVICE}", f"{ssc_name}.{SSC_UDP_SERVICE}"]
        )
        assert await announcer.add(shure) == f"{shure_name}.{SHURE_SERVICE}"  # already registered
        await browser.start()
        await browser.start()  # idempotent
        await wait_for(lambda: shure_name in found and ssc_name in found)
        assert browser.running and browser.stats.found >= 2
        rack, em4 = found[shure_name], found[ssc_name]
        assert (rack.source, rack.address, rack.port) == ("mdns", "127.0.0.1", 42202)
        assert (rack.vendor, rack.family, rack.model, rack.supported) == (
            Vendor.SHURE,
            Family.ULXD,
            "ULXD4Q",
            True,
        )
        assert (em4.port, em4.vendor, em4.family, em4.model, em4.device_id) == (
            40045,
            Vendor.SENNHEISER,
            Family.EWDX,
            "EW-DX EM 4",
            ssc_name,
        )
        # refresh() resolves what is known again; removal is seen and not reported as a device.
        found.clear()
        browser.refresh()
        await wait_for(lambda: shure_name in found)
        await announcer.remove(shure)
        await announcer.remove(shure)
        assert announcer.names == [f"{ssc_name}.{SSC_UDP_SERVICE}"]
    finally:
        await browser.close()
        await announcer.close()
        await announcer.close()
    assert not browser.running


async def test_slp_announcer_and_listener_on_loopback() -> None:
    device_id = unique("ad4q")
    found: list[FoundDevice] = []
    listener = SlpListener(found.append, interfaces=["127.0.0.1"])
    # A long interval: the first announcement is immediate, later ones come only from probes.
    announcer = SlpAnnouncer(AD4Q, device_id=device_id, name="AD Rack", control_port=42203, interval_s=60)
    try:
        await listener.start()
        await listener.start()
        await announcer.start()
        await announcer.start()

        def mine() -> list[FoundDevice]:
            return [f for f in found if f.device_id == announcer.cid]

        await wait_for(lambda: len(mine()) >= 1)
        device = mine()[0]
        assert (device.source, device.address, device.port) == ("slp", "127.0.0.1", 42203)
        assert (device.vendor, device.family, device.model, device.name, device.supported) == (
            Vendor.SHURE,
            Family.AXIENT,
            "AD4Q",
            "AD Rack",
            True,
        )
        # A probe makes the announcer answer at once (unicast to the probe socket).
        before = len(mine())
        listener.probe()
        await wait_for(lambda: len(mine()) > before)
        assert listener.stats.probes == 1
        # Junk on the group is counted, never raised.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            junk.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            junk.sendto(b"\x02\x07junk", (SLP_GROUP, SLP_PORT))
            # A well-formed reply that names no device is ignored.
            junk.sendto(
                encode_message(SlpMessage(FunctionId.ATTR_RPLY, attributes="(foo=bar)")),
                (SLP_GROUP, SLP_PORT),
            )
        await wait_for(lambda: listener.stats.malformed >= 1 and listener.stats.ignored >= 2)
    finally:
        await announcer.close()
        await announcer.close()
        await listener.close()
    assert not listener.running
    sent = announcer.sent
    announcer.announce()  # closed: nothing is sent
    assert announcer.sent == sent


async def test_discovery_service_runs_all_sources() -> None:
    shure_name = unique("Rack ULXD")
    ulxd_id, ur4d_id = unique("ulxd"), unique("ur4d")
    discovered: list[FoundDevice] = []
    adopted: list[FoundDevice] = []

    async def on_discovered(device: FoundDevice) -> None:
        discovered.append(device)
        if device.name == "explodes":
            raise RuntimeError("consumer bug")

    async def on_adopt(device: FoundDevice) -> None:
        adopted.append(device)

    mdns = MdnsAnnouncer([Announcement(SHURE_SERVICE, shure_name, 42210, {"model": "ULXD4Q"})])
    slp_ulxd = SlpAnnouncer(ULXD4D, device_id=ulxd_id, control_port=42211, interval_s=60)
    slp_ur4d = SlpAnnouncer(UR4D, device_id=ur4d_id, control_port=42212, interval_s=60)
    config = DiscoveryConfig(
        interfaces=("127.0.0.1",),
        static=(
            StaticDevice("192.0.2.50", Family.EWDX, name="Stage left"),
            StaticDevice("198.51.100.7", Family.QLXD, name="explodes"),
        ),
        policy=AdoptionPolicy.from_cidrs(deny=["198.51.100.0/24"]),
    )
    service = DiscoveryService(config, on_discovered=on_discovered, on_adopt=on_adopt)
    try:
        await asyncio.gather(mdns.start(), slp_ulxd.start(), slp_ur4d.start())
        await service.start()
        await service.start()
        assert service.running
        ulxd_cid, ur4d_cid = slp_ulxd.cid, slp_ur4d.cid

        def seen(match: Callable[[FoundDevice], bool]) -> list[FoundDevice]:
            return [d for d in discovered if match(d)]

        await wait_for(
            lambda: (
                bool(seen(lambda d: d.name == shure_name))
                and bool(seen(lambda d: d.device_id == ulxd_cid))
                and bool(seen(lambda d: d.device_id == ur4d_cid))
                and bool(seen(lambda d: d.name == "Stage left"))
            )
        )
        await service.wait_idle()
        adopted_by = {(d.source, d.address, d.port) for d in adopted}
        assert ("mdns", "127.0.0.1", 42210) in adopted_by
        assert ("slp", "127.0.0.1", 42211) in adopted_by
        assert ("static", "192.0.2.50", 45) in adopted_by
        assert ("slp", "127.0.0.1", 42212) not in adopted_by  # UR4D: known, no driver
        assert all(d.address != "198.51.100.7" for d in adopted)  # denied by policy
        assert seen(lambda d: d.name == "explodes")  # still discovered
        assert service.stats.callback_errors == 1
        ur4d = seen(lambda d: d.device_id == ur4d_cid)[0]
        assert (ur4d.model, ur4d.family, ur4d.supported) == ("UR4D", None, False)
        # Sightings of known devices are not reported again, nor adopted twice.
        count = len(adopted)
        assert service.slp is not None
        service.slp.probe()
        await asyncio.sleep(0.3)
        await service.wait_idle()
        assert len(adopted) == count
        # rediscover() forgets and reports every device anew.
        discovered.clear()
        service.rediscover()
        await wait_for(
            lambda: (
                bool(seen(lambda d: d.device_id == ulxd_cid)) and bool(seen(lambda d: d.name == shure_name))
            )
        )
        assert {d.identity for d in service.devices()} >= {d.identity for d in discovered}
    finally:
        await service.close()
        await service.close()
        await asyncio.gather(mdns.close(), slp_ulxd.close(), slp_ur4d.close())
    assert not service.running


async def test_scan_reports_progress_and_returns_what_it_found() -> None:
    shure_name = unique("EM6000")
    mdns = MdnsAnnouncer([Announcement(SSC_UDP_SERVICE, shure_name, 42220, {"product": "EM 6000"})])
    slp = SlpAnnouncer(AD4Q, device_id=unique("scan"), interval_s=60)
    progress: list[tuple[int, float]] = []
    service = DiscoveryService(DiscoveryConfig(static=(StaticDevice("192.0.2.60", Family.AXIENT),)))
    try:
        await asyncio.gather(mdns.start(), slp.start())
        devices = await service.scan(2.5, lambda count, done: progress.append((count, done)))
    finally:
        await asyncio.gather(mdns.close(), slp.close())
    assert not service.running  # the scan started the sources and stopped them
    by_source = {(d.source, d.address, d.port, d.family) for d in devices}
    assert ("static", "192.0.2.60", 2202, Family.AXIENT) in by_source
    assert ("slp", "127.0.0.1", 2202, Family.AXIENT) in by_source
    assert ("mdns", "127.0.0.1", 42220, Family.D6000) in by_source
    fractions = [done for _count, done in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 0.1
    assert progress[-1][0] == len(devices)
    assert [c for c, _ in progress] == sorted(c for c, _ in progress)


async def test_scan_on_a_running_service_and_a_full_queue() -> None:
    service = DiscoveryService(
        DiscoveryConfig(
            mdns=False,
            slp=False,
            queue_size=1,
            static=(StaticDevice("192.0.2.70", Family.SLXD), StaticDevice("192.0.2.71", Family.SLXD)),
        )
    )
    await service.start()
    try:
        assert service.stats.dropped == 1  # two static sightings, room for one
        devices = await service.scan(0.05)
        assert [d.address for d in devices] == ["192.0.2.70"]
        assert service.running
    finally:
        await service.close()


async def test_report_merges_moves_and_re_adopts() -> None:
    adopted: list[FoundDevice] = []

    async def on_adopt(device: FoundDevice) -> None:
        adopted.append(device)

    service = DiscoveryService(DiscoveryConfig(mdns=False, slp=False), on_adopt=on_adopt)
    anonymous = FoundDevice(
        source="mdns",
        address="192.0.2.80",
        port=2202,
        vendor=Vendor.SHURE,
        family=Family.AXIENT,
        model="AD4D",
        supported=True,
    )
    service.report(anonymous)  # not running: ignored
    await service.start()
    try:
        service.report(anonymous)
        # The same device with its id: re-keyed, but not adopted a second time.
        identified = FoundDevice(
            source="slp",
            address="192.0.2.80",
            port=2202,
            vendor=Vendor.SHURE,
            family=Family.AXIENT,
            device_id="CID-1",
            supported=True,
        )
        service.report(identified)
        # DHCP gave it a new address: moved, adopted again at the new address.
        service.report(
            FoundDevice(
                source="slp",
                address="192.0.2.81",
                port=2202,
                vendor=Vendor.SHURE,
                family=Family.AXIENT,
                device_id="CID-1",
                supported=True,
            )
        )
        await service.wait_idle()
        assert [d.address for d in adopted] == ["192.0.2.80", "192.0.2.81"]
        assert adopted[-1].model == "AD4D"
        assert (service.stats.new, service.stats.changed, service.stats.moved) == (1, 1, 1)
        assert len(service.devices()) == 1
    finally:
        await service.close()


async def test_close_drops_pending_sightings() -> None:
    service = DiscoveryService(
        DiscoveryConfig(mdns=False, slp=False, static=(StaticDevice("192.0.2.90", Family.ULXD),))
    )
    await service.start()
    await service.close()  # the worker never ran: the static sighting is dropped
    assert service.stats.sightings == 0
    await service.wait_idle()  # nothing left pending


async def test_non_local_interface_is_refused_without_sending() -> None:
    # 192.0.2.99 is not an address of this host: joining and binding fail before anything is sent.
    service = DiscoveryService(DiscoveryConfig(interfaces=("192.0.2.99",), mdns=False))
    with pytest.raises(OSError):
        await service.start()
    assert not service.running
    announcer = SlpAnnouncer(AD4Q, device_id="x", interface="192.0.2.99")
    with pytest.raises(OSError):
        await announcer.start()
    listener = SlpListener(lambda _f: None, interfaces=["192.0.2.99"])
    with pytest.raises(OSError):
        await listener.start()
    assert not listener.running
