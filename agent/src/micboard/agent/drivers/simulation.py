"""What every receiver simulator offers: start/stop, where it listens, how to announce it,
and fault injection for tests. Simulators answer exactly as the hardware does."""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field

from micboard.shared.model import Family, Vendor


@dataclass(slots=True)
class Faults:
    """Faults a test can switch on at run time; the simulator checks them as it works.

    - ``silent``: accept connections/datagrams but never answer or push anything.
    - ``delay_s``: answer every request this much later.
    - ``garbage``: interleave random junk bytes with real replies.
    - ``rep_err``: answer every request with the device's error reply.
    - ``loss``: probability (0..1) that an outgoing UDP datagram is dropped.
    Dropping live connections is a method of the simulator (:meth:`ReceiverSimulator.drop_connections`).
    """

    silent: bool = False
    delay_s: float = 0.0
    garbage: bool = False
    rep_err: bool = False
    loss: float = 0.0


@dataclass(frozen=True, slots=True)
class Announcement:
    """How a simulator presents itself on DNS-SD (and SLP for Shure)."""

    service_type: str  # e.g. "_shure._tcp.local." or "_ssc._udp.local."
    instance_name: str
    port: int
    properties: dict[str, str] = field(default_factory=dict)
    slp_dcid: str | None = None  # Shure SLP device class id, None when not announced over SLP


class ReceiverSimulator(abc.ABC):
    """A simulated receiver listening on ``host:port``; deterministic for a given ``seed``.

    ``time_scale`` speeds up slow processes such as battery drain (60 = one minute per second).
    """

    vendor: Vendor
    family: Family

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0, time_scale: float = 1.0
    ) -> None:
        self.host = host
        self.port = port
        self.seed = seed
        self.time_scale = time_scale
        self.random = random.Random(seed)  # noqa: S311 - simulation, not security  # nosec B311
        self.faults = Faults()

    @property
    @abc.abstractmethod
    def model(self) -> str:
        """The model name the device reports (e.g. ``ULXD4Q``)."""

    @property
    @abc.abstractmethod
    def device_id(self) -> str:
        """The device id / serial the device reports."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind and start serving; afterwards ``port`` is the bound port."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop serving and close every connection; safe to call twice."""

    @abc.abstractmethod
    async def drop_connections(self) -> None:
        """Close every controller connection abruptly (TCP) or forget subscribers (UDP)."""

    @abc.abstractmethod
    def announcement(self) -> Announcement:
        """What to announce over DNS-SD / SLP for this simulator."""
