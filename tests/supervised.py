"""What a device supervisor tells its listener, recorded for tests."""

from __future__ import annotations

from collections.abc import Sequence

from micboard.agent.drivers.base import DriverOptions
from micboard.shared.model import ChannelMeter, Device

#: Driver options for a Sennheiser simulator on loopback: quick to connect, to notice silence and
#: to retry, so that a move or a restart settles within a test.
SSC_FAST = DriverOptions(
    connect_timeout_s=0.5,
    command_timeout_s=0.5,
    backoff_initial_s=0.1,
    backoff_max_s=0.2,
    poll_interval_s=0.3,
    silence_timeout_s=1.0,
)

#: The calls by which something is published under a key (track and forget publish nothing).
REPORTS = ("device", "meters", "link")


class Recorder:
    """The supervisor's listener: keeps every call, by device key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def device_updated(self, device: Device) -> None:
        self.calls.append(("device", device.device_key))

    def meters_updated(self, device_key: str, meters: Sequence[ChannelMeter]) -> None:
        self.calls.append(("meters", device_key))

    def link_changed(self, device_key: str, online: bool, reason: str) -> None:
        self.calls.append(("link", device_key))

    def track(self, device_key: str) -> None:
        self.calls.append(("track", device_key))

    def forget(self, device_key: str) -> None:
        self.calls.append(("forget", device_key))

    def reported(self) -> set[str]:
        """Every key something was published under (states, meters, links; not track/forget)."""
        return {key for kind, key in self.calls if kind in REPORTS}
