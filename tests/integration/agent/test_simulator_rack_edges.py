"""The simulator rack: refused kinds, a start that fails half-way, SLP announcements, idempotence."""

from __future__ import annotations

import secrets

import pytest

from micboard.agent.simulate import SimulatorRack, rack_kinds
from micboard.shared.natsd import free_port


def test_unknown_kinds_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown simulator kind\(s\) ulxd9, nope; known: ulxd4"):
        SimulatorRack(["ulxd4", "ulxd9", "nope"])
    assert rack_kinds([" ULXD4 ", "EWDX-EM2"]) == ["ulxd4", "ewdx-em2"]
    with pytest.raises(ValueError, match=r"unknown device kind\(s\) x1; choose from"):
        rack_kinds(["ulxd4", "X1"])


async def test_a_failed_start_stops_what_was_started() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: binding there fails, and nothing
    # of the rack may be left behind.
    rack = SimulatorRack(["ewdx-em2", "ulxd4"], host="192.0.2.1", announce=False, fixed_ports=True)
    with pytest.raises(OSError):
        await rack.start()
    assert rack.slots == [] and rack.simulators == []
    await rack.stop()  # safe again


async def test_slp_announced_rack_describes_itself_and_starts_once() -> None:
    tag = secrets.token_hex(3)
    rack = SimulatorRack(
        ["ulxd4", "ewdx-em2"],
        seed=5,
        activity=0.0,
        fixed_ports=False,
        slp=True,
        slp_interval_s=60.0,
        service_types={
            "_shure._tcp.local.": f"_mb{tag}._tcp.local.",
            "_ssc._udp.local.": f"_mb{tag}._udp.local.",
        },
    )
    await rack.start()
    try:
        first = list(rack.simulators)
        await rack.start()  # already running: nothing new
        assert rack.simulators == first
        lines = rack.describe()
        assert len(lines) == 2
        assert lines[0].startswith("ulxd4") and f"mdns _mb{tag}._tcp.local." in lines[0]
        assert "listening on tcp 127.0.0.1:" in lines[0] and "listening on udp 127.0.0.1:" in lines[1]
        assert any(line.endswith("+ slp)") for line in lines)
        entries = rack.static_devices()
        assert [e["port"] for e in entries] == [s.port for s in first]
        assert all(e["name"] and e["address"] == "127.0.0.1" for e in entries)
        assert len(rack._slp) >= 1
    finally:
        await rack.stop()
    assert rack.slots == [] and rack._slp == [] and rack._mdns is None


async def test_a_port_base_puts_each_simulator_at_base_plus_its_position_every_time() -> None:
    base = free_port()
    for _ in range(2):  # started again: the same addresses
        rack = SimulatorRack(["ulxd4", "ewdx-em2", "ad4d"], activity=0.0, announce=False, port_base=base)
        await rack.start()
        try:
            assert [s.port for s in rack.simulators] == [base, base + 1, base + 2]
            assert "listening on udp 127.0.0.1:" + str(base + 1) in rack.describe()[1]
        finally:
            await rack.stop()
    with pytest.raises(ValueError, match="port base 65535 leaves no room for 2 simulator"):
        SimulatorRack(["ulxd4", "ad4d"], port_base=65535)
