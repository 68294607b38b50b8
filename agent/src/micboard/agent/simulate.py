"""A rack of simulated receivers: started together, announced on DNS-SD (and SLP for Shure).

Used by ``micboard-agent simulate``, the demo, the tests and the bench. Ports follow the
hardware: Shure receivers listen on 2202 + their index in the rack; Sennheiser's SSC port 45
needs root, so without root each Sennheiser simulator takes a free port instead (printed by
:meth:`SimulatorRack.describe`). With ``fixed_ports=False`` every simulator takes a free port;
with ``port_base`` each takes ``port_base`` plus its position in the rack (TCP for Shure, UDP
for Sennheiser), so that a rack started again is found at the same addresses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from micboard.agent.discovery.mdns import MdnsAnnouncer
from micboard.agent.discovery.slp import SlpAnnouncer
from micboard.agent.drivers.sennheiser import SSC_SIMULATOR_KINDS, SscSimulator
from micboard.agent.drivers.shure import SHURE_SIMULATOR_KINDS, ShureSimulator
from micboard.agent.drivers.simulation import Announcement, ReceiverSimulator
from micboard.shared.model import Vendor

log = logging.getLogger(__name__)

SHURE_PORT = 2202
SSC_PORT = 45
SIMULATOR_KINDS: tuple[str, ...] = (*SHURE_SIMULATOR_KINDS, *SSC_SIMULATOR_KINDS)
"""Every kind of receiver the rack can simulate."""


def _is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


@dataclass(frozen=True, slots=True)
class RackSlot:
    """One simulator of the rack and how it was announced."""

    kind: str
    simulator: ReceiverSimulator
    announcement: Announcement | None = None

    @property
    def transport(self) -> str:
        """``tcp`` for Shure, ``udp`` for Sennheiser SSC."""
        return "tcp" if self.simulator.vendor is Vendor.SHURE else "udp"

    def static_entry(self) -> dict[str, Any]:
        """This simulator as an agent ``static_devices`` entry."""
        return {
            "address": self.simulator.host,
            "port": self.simulator.port,
            "family": self.simulator.family.value,
            "name": self.announcement.instance_name if self.announcement else self.simulator.device_id,
        }


class SimulatorRack:
    """Starts, announces and stops a list of simulators of the given ``kinds``.

    ``service_types`` renames DNS-SD service types (``{"_shure._tcp.local.": "_x._tcp.local."}``)
    so that a test can browse its own rack and nothing else on a shared host.
    """

    def __init__(
        self,
        kinds: Iterable[str],
        *,
        host: str = "127.0.0.1",
        seed: int = 0,
        time_scale: float = 1.0,
        activity: float = 1.0,
        announce: bool = True,
        slp: bool = True,
        fixed_ports: bool = True,
        service_types: Mapping[str, str] | None = None,
        slp_interval_s: float = 5.0,
        port_base: int | None = None,
    ) -> None:
        self.kinds = list(kinds)
        unknown = [k for k in self.kinds if k not in SIMULATOR_KINDS]
        if unknown:
            raise ValueError(
                f"unknown simulator kind(s) {', '.join(unknown)}; known: {', '.join(SIMULATOR_KINDS)}"
            )
        self.host = host
        self.seed = seed
        self.time_scale = time_scale
        self.activity = activity
        self.announce = announce
        self.slp = slp
        self.fixed_ports = fixed_ports
        if port_base is not None and not 1 <= port_base <= 65535 - len(self.kinds) + 1:
            raise ValueError(f"port base {port_base} leaves no room for {len(self.kinds)} simulator(s)")
        self.port_base = port_base
        self.service_types = dict(service_types or {})
        self.slp_interval_s = slp_interval_s
        self.slots: list[RackSlot] = []
        self._mdns: MdnsAnnouncer | None = None
        self._slp: list[SlpAnnouncer] = []

    @property
    def simulators(self) -> list[ReceiverSimulator]:
        """The running simulators, in rack order."""
        return [slot.simulator for slot in self.slots]

    def _build(self) -> list[tuple[str, ReceiverSimulator]]:
        built: list[tuple[str, ReceiverSimulator]] = []
        shure_index = ssc_index = 0
        for position, kind in enumerate(self.kinds):
            seed = self.seed + position
            simulator: ReceiverSimulator
            if kind in SHURE_SIMULATOR_KINDS:
                port = SHURE_PORT + shure_index if self.fixed_ports else 0
                if self.port_base is not None:
                    port = self.port_base + position
                simulator = ShureSimulator(
                    kind, index=shure_index, host=self.host, port=port, seed=seed,
                    time_scale=self.time_scale, activity=self.activity,
                )  # fmt: skip
                shure_index += 1
            else:
                port = SSC_PORT + ssc_index if self.fixed_ports and _is_root() else 0
                if self.port_base is not None:
                    port = self.port_base + position
                simulator = SscSimulator(
                    kind, host=self.host, port=port, seed=seed, time_scale=self.time_scale
                )
                ssc_index += 1
            built.append((kind, simulator))
        return built

    async def start(self) -> None:
        """Start every simulator, then announce them; on failure everything started is stopped."""
        if self.slots:
            return
        try:
            for kind, simulator in self._build():
                await simulator.start()
                self.slots.append(RackSlot(kind, simulator))
            if self.announce:
                await self._announce()
        except BaseException:
            await self.stop()
            raise

    async def _announce(self) -> None:
        announced: list[RackSlot] = []
        for slot in self.slots:
            original = slot.simulator.announcement()
            renamed = self.service_types.get(original.service_type, original.service_type)
            announced.append(
                dataclasses.replace(slot, announcement=dataclasses.replace(original, service_type=renamed))
            )
        self.slots = announced
        self._mdns = MdnsAnnouncer(
            [s.announcement for s in announced if s.announcement is not None],
            address=self.host,
            interfaces=[self.host],
        )
        await self._mdns.start()
        if not self.slp:
            return
        for slot in announced:
            if slot.announcement is None:
                continue
            announcer = SlpAnnouncer.for_announcement(
                slot.announcement,
                device_id=slot.simulator.device_id,
                interface=self.host,
                interval_s=self.slp_interval_s,
            )
            if announcer is not None:
                self._slp.append(announcer)
                await announcer.start()

    async def stop(self) -> None:
        """Withdraw the announcements and stop every simulator; safe to call twice."""
        slp, self._slp = self._slp, []
        for announcer in slp:
            await announcer.close()
        mdns, self._mdns = self._mdns, None
        if mdns is not None:
            await mdns.close()
        slots, self.slots = self.slots, []
        for slot in slots:
            await slot.simulator.stop()

    def static_devices(self) -> list[dict[str, Any]]:
        """The rack as the agent's ``static_devices`` setting."""
        return [slot.static_entry() for slot in self.slots]

    def describe(self) -> list[str]:
        """One line per simulator: kind, model, id, where it listens and how it is announced."""
        lines = []
        for slot in self.slots:
            sim = slot.simulator
            announced = "not announced"
            if slot.announcement is not None:
                announced = f"mdns {slot.announcement.service_type}"
                if self.slp and slot.announcement.slp_dcid is not None:
                    announced += " + slp"
            lines.append(
                f"{slot.kind:<9} {sim.model:<11} id={sim.device_id:<12} "
                f"listening on {slot.transport} {sim.host}:{sim.port} ({announced})"
            )
        return lines


def rack_kinds(requested: Sequence[str]) -> list[str]:
    """Validate ``--device`` values (case-insensitive); raises ``ValueError`` naming the bad ones."""
    kinds = [k.strip().lower() for k in requested]
    unknown = [k for k in kinds if k not in SIMULATOR_KINDS]
    if unknown:
        raise ValueError(
            f"unknown device kind(s) {', '.join(unknown)}; choose from {', '.join(SIMULATOR_KINDS)}"
        )
    return kinds
