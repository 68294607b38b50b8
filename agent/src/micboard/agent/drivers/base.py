"""What every receiver driver offers the supervisor, and what it reports back.

A driver owns one connection to one receiver. It turns what the device says into the
normalized model (:class:`~micboard.shared.model.Device` and
:class:`~micboard.shared.model.ChannelMeter`) and tells a :class:`DeviceListener`. It never
raises on device bytes: bad input is logged, counted in :class:`DriverStats` and skipped.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from micboard.shared.envelope import CommandAction, CommandOutcome
from micboard.shared.model import ChannelMeter, Device, Family


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """Where a receiver is and what it is expected to be."""

    address: str
    port: int
    family: Family
    device_key: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """Timing of a driver; the defaults follow what common controllers do."""

    meter_interval_ms: int = 100
    silence_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    command_timeout_s: float = 2.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    poll_interval_s: float = 5.0
    max_line_bytes: int = 64 * 1024


@dataclass(slots=True)
class DriverStats:
    """Counters of one driver, exported as metrics."""

    messages: int = 0
    parse_errors: int = 0
    device_errors: int = 0
    connects: int = 0
    reconnects: int = 0
    dropped_bytes: int = 0
    meters: int = 0


@dataclass(frozen=True, slots=True)
class CommandReply:
    """The typed outcome of a command a driver was asked to carry out."""

    outcome: CommandOutcome
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class DriverCommand:
    """A command for one device: rename / identify / mute / unmute, optionally of a channel."""

    action: CommandAction
    channel: int | None = None
    value: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class DeviceListener(Protocol):
    """Receives what a driver learns. Called from the driver's task; must not block."""

    def device_updated(self, device: Device) -> None:
        """The device's normalized state changed (or was read in full after connecting)."""

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        """New live levels for some channels."""

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        """The device answered again (``online``) or went silent / unreachable.

        ``reason``: ``connected``, ``silent`` or ``connect_failed``, optionally followed by ``": "``
        and what the driver saw (sent as the ``offline`` event's detail).
        """


def split_reason(reason: str) -> tuple[str, str | None]:
    """A :meth:`DeviceListener.link_changed` reason as its code and what the driver saw (or ``None``)."""
    code, _, said = reason.partition(": ")
    return code, said or None


class ReceiverDriver(abc.ABC):
    """One connection to one receiver, kept alive until :meth:`stop`."""

    def __init__(
        self,
        target: DeviceTarget,
        listener: DeviceListener,
        options: DriverOptions | None = None,
    ) -> None:
        self.target = target
        self.listener = listener
        self.options = options or DriverOptions()
        self.stats = DriverStats()

    @property
    @abc.abstractmethod
    def device(self) -> Device | None:
        """The latest normalized state, or ``None`` before the first full read."""

    @property
    @abc.abstractmethod
    def online(self) -> bool:
        """Whether the device is answering now."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, read and meter, reconnecting with backoff, until cancelled or stopped."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop politely (switch metering off, close sockets); safe to call twice."""

    @abc.abstractmethod
    async def execute(self, command: DriverCommand) -> CommandReply:
        """Carry out ``command``; unsupported actions return ``NOT_SUPPORTED``, never raise."""
