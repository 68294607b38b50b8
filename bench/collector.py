#!/usr/bin/env python3
"""Sustained collector ingest rate into SQLite and PostgreSQL, next to a bare consumer of the same messages.

A simulated fleet (default 500 sites x 4 receivers x 4 channels, one delta per channel per
second, a heartbeat per agent every 10 s) is published through the agent's own publishing code
(:class:`EnvelopeFactory`, :class:`JetStreamPublisher`) into an embedded nats-server. The same
messages are then consumed three ways, each by its own durable consumer:

- bare: fetch + msgpack unpack + ack, the floor any consumer pays, with the collector's own
  :class:`PullFetcher` (the ratios are to this one) and, for reference, with nats-py's
  ``PullSubscription.fetch``;
- the real :class:`IngestConsumer`, with alert rules and history wired as in the collector,
  into a fresh SQLite file;
- the real :class:`IngestConsumer` into a scratch PostgreSQL database
  (``MICBOARD_TEST_PG_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``).

Goals: >= 10,000 events/s into SQLite with one collector process, and >= 50 % of the bare rate.
Run: ``.venv/bin/python bench/collector.py [--sites 500] [--seconds 10] [--database both]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import func, select

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.ingest import IngestConsumer, ensure_stream
from micboard.collector.pull import PullFetcher
from micboard.collector.runtime import tune_gc
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.history import HistoryService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.collector.store.schema import applied_events
from micboard.shared.envelope import DeviceBody, HeartbeatBody, HelloBody
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor
from micboard.shared.natsd import EmbeddedNats
from pg import scratch_database

HEARTBEAT_EVERY_S = 10


@dataclass(frozen=True, slots=True)
class Fleet:
    """The shape of the simulated fleet."""

    sites: int
    receivers: int
    channels: int
    seconds: int


def receiver(index: int, channels: int) -> Device:
    """A receiver with every channel linked to a transmitter."""
    return Device(
        device_key=f"rx-{index:02d}",
        vendor=Vendor.SHURE,
        family=Family.ULXD,
        model="ULXD4Q",
        address=f"10.0.0.{index + 10}",
        port=2202,
        channels=tuple(
            ReceiverChannel(
                index=c,
                name=f"HH{c:02d} Person",
                frequency_khz=578_350 + c * 400,
                transmitter=Transmitter(model="ULXD2", battery_bars=5, battery_percent=100, runtime_min=600),
            )
            for c in range(1, channels + 1)
        ),
    )


async def publish_agent(
    publisher: JetStreamPublisher, site: int, fleet: Fleet, in_flight: asyncio.Semaphore
) -> int:
    """Everything one agent sends, in its order (an agent publishes one event at a time)."""
    factory = EnvelopeFactory(f"site-{site:04d}", f"pi-{site:04d}")
    bodies: list[Any] = [HelloBody(version="bench", hostname=f"pi-{site:04d}")]
    bodies += [
        DeviceBody(device_key=f"rx-{r:02d}", snapshot=receiver(r, fleet.channels))
        for r in range(fleet.receivers)
    ]
    for second in range(fleet.seconds):
        if second % HEARTBEAT_EVERY_S == 0:
            bodies.append(HeartbeatBody(uptime_s=float(second), devices_by_state={"online": fleet.receivers}))
        for r in range(fleet.receivers):
            for c in range(1, fleet.channels + 1):
                percent = max(0, 100 - second - c)
                tx = {"model": "ULXD2", "battery_bars": percent // 20, "battery_percent": percent,
                      "runtime_min": percent * 6}  # fmt: skip
                bodies.append(
                    DeviceBody(device_key=f"rx-{r:02d}", changes={"channels": {c: {"transmitter": tx}}})
                )
    for body in bodies:
        event = factory.make(body)
        async with in_flight:
            await publisher.publish(event)
    return len(bodies)


async def publish_fleet(nc: Client, fleet: Fleet, max_in_flight: int) -> tuple[int, float]:
    """Publish the whole fleet's traffic; returns (events, seconds)."""
    publisher = JetStreamPublisher(nc, timeout_s=30.0)
    in_flight = asyncio.Semaphore(max_in_flight)
    started = time.perf_counter()
    counts = await asyncio.gather(
        *(publish_agent(publisher, s, fleet, in_flight) for s in range(fleet.sites))
    )
    return sum(counts), time.perf_counter() - started


async def bare_rate(nc: Client, settings: CollectorSettings, total: int, *, lean: bool) -> float:
    """Fetch, unpack and ack every message with nothing else: the rate any consumer is bounded by.

    ``lean``: with the collector's own :class:`PullFetcher`; else with nats-py's
    ``PullSubscription.fetch``, for reference.
    """
    js = nc.jetstream()
    durable = "bench-bare-lean" if lean else "bench-bare-nats-py"
    await js.add_consumer(
        settings.stream_name,
        ConsumerConfig(
            durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60, max_ack_pending=settings.batch_size * 8,
        ),
    )  # fmt: skip
    fetch: Callable[[], Awaitable[list[Msg]]]
    if lean:
        fetcher = PullFetcher(nc, settings.stream_name, durable)
        await fetcher.start()

        def fetch() -> Awaitable[list[Msg]]:
            return fetcher.fetch(settings.batch_size, 1.0)
    else:
        sub = await js.pull_subscribe_bind(durable, stream=settings.stream_name)

        async def fetch() -> list[Msg]:
            try:
                return await sub.fetch(settings.batch_size, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                return []

    done = 0
    started = time.perf_counter()
    while done < total:
        msgs = await fetch()
        for msg in msgs:
            msgpack.unpackb(msg.data, raw=False, strict_map_key=False)
            await msg.ack()
        done += len(msgs)
    elapsed = time.perf_counter() - started
    if lean:
        await fetcher.close()
    else:
        await sub.unsubscribe()
    return done / elapsed


async def ingest_rate(
    nc: Client, settings: CollectorSettings, url: str, total: int
) -> tuple[float, dict[str, int]]:
    """Run the real IngestConsumer until every message is applied; returns (events/s, outcomes)."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        # Wired as the Collector wires it: alert rules in each batch's transaction, history after it.
        history = HistoryService(engine)
        ingest = IngestConsumer(nc, engine, settings, alerts=AlertService(engine), history=history)
        await ingest.start()
        started = time.perf_counter()
        running = asyncio.create_task(ingest.run())
        while ingest.stats.events < total:  # noqa: ASYNC110 - polls a counter the consumer owns
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        ingest.stop()
        await running
        await history.close()
        async with engine.connect() as conn:
            applied = (await conn.execute(select(func.count()).select_from(applied_events))).scalar_one()
        if applied != total:
            raise SystemExit(f"{url}: {applied} events recorded, expected {total}")
        stats = ingest.stats
        if stats.failed_batches:
            print(f"  {stats.failed_batches} failed batches, {stats.isolated_events} events retried alone")
        return stats.events / elapsed, dict(stats.outcomes)
    finally:
        await engine.dispose()


async def main() -> None:
    """Publish the fleet, then measure bare, SQLite and PostgreSQL consumption of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--receivers", type=int, default=4)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10, help="simulated seconds of fleet traffic")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=CollectorSettings().batch_size)
    parser.add_argument(
        "--gc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: the collector's own garbage collector settings (micboard.collector.runtime); "
        "default: CPython's",
    )
    parser.add_argument("--in-flight", type=int, default=512, help="bound on unacknowledged publishes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.gc == "tuned":
        tune_gc()  # as the collector does once started; it applies to the bare consumer too
    fleet = Fleet(args.sites, args.receivers, args.channels, args.seconds)
    with (
        tempfile.TemporaryDirectory(prefix="micboard-bench-") as tmp,
        EmbeddedNats(store_dir=Path(tmp) / "nats") as server,
    ):
        nc = await nats.connect(server.url)
        base = CollectorSettings(nats_url=server.url, state_dir=Path(tmp), batch_size=args.batch_size)
        await ensure_stream(nc.jetstream(), base)
        total, seconds = await publish_fleet(nc, fleet, args.in_flight)
        print(
            f"fleet: {fleet.sites} sites x {fleet.receivers} receivers x {fleet.channels} channels, "
            f"{fleet.seconds} s of 1 Hz deltas = {total} events; published in {seconds:.1f} s "
            f"({total / seconds:,.0f} events/s); batch {args.batch_size}, gc {args.gc}"
        )
        reference = await bare_rate(nc, base, total, lean=False)
        print(f"bare, nats-py fetch:     {reference:10,.0f} events/s  (reference)")
        bare = await bare_rate(nc, base, total, lean=True)
        print(f"bare fetch+unpack+ack:   {bare:10,.0f} events/s  (the collector's fetcher; ratios below)")
        async with contextlib.AsyncExitStack() as stack:
            targets: list[tuple[str, str]] = []
            if args.database in ("sqlite", "both"):
                targets.append(("sqlite", f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"))
            if args.database in ("postgres", "both"):
                targets.append(("postgres", await stack.enter_async_context(scratch_database())))
            for name, url in targets:
                settings = base.model_copy(update={"durable_name": f"bench-{name}"})
                rate, outcomes = await ingest_rate(nc, settings, url, total)
                print(
                    f"ingest into {name:9s}  {rate:10,.0f} events/s  ({rate / bare:.0%} of bare)  "
                    f"outcomes {outcomes}"
                )
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
