#!/usr/bin/env python3
"""Envelope encode/decode rates next to raw msgpack of the same dict, measured in one run.

The ratio (envelope rate / raw rate) is the cost of validation; the goal is >= 0.25.
Run: ``.venv/bin/python bench/wire.py [--seconds 1.0]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack

from micboard.shared.codec import decode, encode
from micboard.shared.envelope import AnyEvent, DeviceBody, DeviceEvent, HeartbeatBody, HeartbeatEvent
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor, device_changes
from report import emit

BASE: dict[str, Any] = {
    "site": "venue-1",
    "agent": "pi-01",
    "boot": "0123456789abcdef",
    "ts": 1_764_300_000_000,
}


def sample_events() -> dict[str, AnyEvent]:
    """A delta (the common case), a 4-channel snapshot and a heartbeat."""
    channels = tuple(
        ReceiverChannel(
            index=i,
            name=f"HH{i:02d} Person",
            frequency_khz=578_350 + i * 400,
            group_channel="1,1",
            transmitter=Transmitter(
                model="ULXD2", battery_bars=4, battery_percent=80, runtime_min=300, battery_type="LION"
            ),
        )
        for i in range(1, 5)
    )
    device = Device(
        device_key="shure-0001",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4Q",
        device_id="ABC123",
        firmware="2.7.10",
        address="10.0.0.5",
        port=2202,
        channels=channels,
    )
    changed = device.model_copy(
        update={
            "channels": (
                channels[0].model_copy(
                    update={
                        "transmitter": channels[0].transmitter.model_copy(  # type: ignore[union-attr]
                            update={"battery_percent": 79, "runtime_min": 295}
                        )
                    }
                ),
            )
            + channels[1:]
        }
    )
    return {
        "delta": DeviceEvent(
            **BASE, seq=2, body=DeviceBody(device_key="shure-0001", changes=device_changes(device, changed))
        ),
        "snapshot": DeviceEvent(**BASE, seq=1, body=DeviceBody(device_key="shure-0001", snapshot=device)),
        "heartbeat": HeartbeatEvent(
            **BASE, seq=3, body=HeartbeatBody(uptime_s=3600.0, devices_by_state={"online": 8})
        ),
    }


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    count, batch = 0, 200
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            fn()
        count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    """Print one row per event kind: envelope and raw rates and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per figure")
    args = parser.parse_args()
    print(
        f"{'event':<10} {'bytes':>6} {'encode/s':>10} {'packb/s':>10} {'ratio':>6} "
        f"{'decode/s':>10} {'unpackb/s':>10} {'ratio':>6}"
    )
    for name, event in sample_events().items():
        data = encode(event)
        raw = event.model_dump(mode="python")
        enc = rate(lambda e=event: encode(e), args.seconds)  # type: ignore[misc]
        pack = rate(lambda r=raw: msgpack.packb(r, use_bin_type=True), args.seconds)  # type: ignore[misc]
        dec = rate(lambda d=data: decode(d), args.seconds)  # type: ignore[misc]
        unpack = rate(lambda d=data: msgpack.unpackb(d, strict_map_key=False), args.seconds)  # type: ignore[misc]
        emit("wire", f"{name} decode/unpackb ratio", round(dec / unpack, 3), "x", ">= 0.25")
        emit("wire", f"{name} decode", round(dec), "events/s")
        print(
            f"{name:<10} {len(data):>6} {enc:>10,.0f} {pack:>10,.0f} {enc / pack:>6.2f} "
            f"{dec:>10,.0f} {unpack:>10,.0f} {dec / unpack:>6.2f}"
        )


if __name__ == "__main__":
    main()
