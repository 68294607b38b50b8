"""A fixed in-process receiver: what an agent with no hardware and no simulator reports."""

from __future__ import annotations

from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor

_PEOPLE = ("Fatai", "Ines", "Marek", "Sun")


def demo_device(address: str = "127.0.0.1") -> Device:
    """A four-channel ULX-D receiver with transmitters in varied battery states."""
    channels = tuple(
        ReceiverChannel(
            index=i,
            name=f"HH{i:02d} {_PEOPLE[i - 1]}",
            frequency_khz=578_350 + 400 * i,
            group_channel=f"1,{i}",
            transmitter=Transmitter(
                model="ULXD2",
                battery_bars=5 - i,
                battery_percent=100 - 22 * i,
                runtime_min=420 - 90 * i,
                battery_type="LION",
            ),
        )
        for i in range(1, 5)
    )
    return Device(
        device_key="demo-ulxd4q",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4Q",
        device_id="DEMO-ULXD4Q",
        firmware="2.7.10",
        rf_band="G50",
        address=address,
        port=2202,
        channels=channels,
    )
