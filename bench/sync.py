#!/usr/bin/env python3
"""Synchronization CPU per event, by how many devices an ingest batch touches, side by side in one run.

The same number of channel deltas (a transmitter's battery, as ``bench/api.py`` sends) is applied
through :meth:`SynchronizationService.apply_batch_changes` into SQLite in batches of ``--batch``
events, twice: spread over the fleet (each event a device picked at random, so a batch touches
almost as many devices as it has events, as 5,000 deltas/s from a large fleet do) and grouped
(runs of ``--group`` events for one device, as an agent reporting several channels of a receiver
at once does). The figure is the main thread's CPU time (``time.thread_time``) per event, with the
collector's garbage collector tuning; SQLite's own work runs in the driver's thread and is not in
it. The difference between the two, divided by the difference in devices per batch, is what one
more device in a batch costs. Run: ``.venv/bin/python bench/sync.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from micboard.collector.runtime import tune_gc
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.envelope import DeviceBody, DeviceEvent, HelloBody, HelloEvent
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor
from report import emit

BENCH = "sync"


def receiver(k: int, channels: int) -> Device:
    """A 4-channel receiver with a transmitter on every channel."""
    tx = Transmitter(
        model="ULXD2", battery_bars=4, battery_percent=80, runtime_min=300, battery_type="LION", muted=False
    )
    return Device(
        device_key=f"rx{k}", vendor=Vendor.SHURE, family=Family.ULXD, model="ULXD4Q",
        channels=[
            ReceiverChannel(index=i, name=f"HH{i:02d} P{k}", frequency_khz=500_000 + i, transmitter=tx)
            for i in range(1, channels + 1)
        ],
    )  # fmt: skip


async def run(layout: str, args: argparse.Namespace) -> tuple[float, float]:
    """Apply ``args.batches`` batches laid out as ``layout``; returns (us per event, devices per batch)."""
    with tempfile.TemporaryDirectory(prefix="micboard-bench-sync-") as tmp:
        engine = create_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'sync.db'}")
        try:
            await upgrade(engine)
            sync = SynchronizationService()
            seq = 0

            def event(body: DeviceBody) -> DeviceEvent:
                nonlocal seq
                seq += 1
                return DeviceEvent(site="venue", agent="pi", boot="boot", seq=seq, ts=seq, body=body)

            async with engine.begin() as conn:
                hello = HelloEvent(
                    site="venue", agent="pi", boot="boot", seq=0, ts=0, body=HelloBody(version="x")
                )
                await sync.apply_batch(conn, [hello])
                snapshots = [
                    event(DeviceBody(device_key=f"rx{k}", snapshot=receiver(k, args.channels)))
                    for k in range(args.devices)
                ]
                await sync.apply_batch(conn, snapshots)
            rng = random.Random(1)
            tune_gc()
            cpu, marker, touched = 0.0, 0, 0
            for b in range(args.batches):
                events = []
                for i in range(args.batch):
                    marker += 1
                    if layout == "spread":
                        k = rng.randrange(args.devices)
                    else:
                        k = (b * args.batch + i) // args.group % args.devices
                    tx: dict[str, Any] = {
                        "model": "ULXD2", "battery_bars": 3, "battery_percent": 60 + marker % 7,
                        "runtime_min": 1_000_000 + marker, "battery_type": "LION", "muted": False,
                    }  # fmt: skip
                    channel = rng.randrange(1, args.channels + 1)
                    events.append(
                        event(
                            DeviceBody(
                                device_key=f"rx{k}", changes={"channels": {channel: {"transmitter": tx}}}
                            )
                        )
                    )
                touched += len({e.body.device_key for e in events})
                started = time.thread_time()
                async with engine.begin() as conn:
                    changes = await sync.apply_batch_changes(conn, events)
                sync.committed(changes)
                cpu += time.thread_time() - started
            return cpu / (args.batches * args.batch) * 1e6, touched / args.batches
        finally:
            await engine.dispose()


def main() -> None:
    """Parse the options, run both layouts, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=900, help="events per batch")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--group", type=int, default=4, help="events in a row for one device (grouped)")
    args = parser.parse_args()
    spread_us, spread_devices = asyncio.run(run("spread", args))
    grouped_us, grouped_devices = asyncio.run(run("grouped", args))
    per_device = (spread_us - grouped_us) * args.batch / (spread_devices - grouped_devices)
    print(
        f"{args.batches} batches of {args.batch} channel deltas, "
        f"{args.devices} receivers of {args.channels} channels"
    )
    print(f"spread:  {spread_us:6.1f} us main-thread CPU per event ({spread_devices:,.0f} devices per batch)")
    print(
        f"grouped: {grouped_us:6.1f} us main-thread CPU per event ({grouped_devices:,.0f} devices per batch)"
    )
    print(f"spread / grouped: {spread_us / grouped_us:.2f}x; one more device in a batch: {per_device:.1f} us")
    emit(BENCH, "sync CPU per event, spread", round(spread_us, 1), "us")
    emit(BENCH, "sync CPU per event, grouped", round(grouped_us, 1), "us")
    emit(BENCH, "sync CPU per device in a batch", round(per_device, 1), "us")


if __name__ == "__main__":
    main()
