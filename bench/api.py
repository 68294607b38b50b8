#!/usr/bin/env python3
"""REST list latency and live WebSocket fan-out of a real collector, next to bare aiohttp, in one run.

The database holds 16,000 channels: one big venue (80 receivers x 4 channels = 320 channels),
19 theatres (20 x 4) and 885 small venues (4 x 4), 4,000 receivers in all, applied through the
real :class:`SynchronizationService` (snapshots in batches of 500 events) with alerts evaluated
by the real :class:`AlertService` as ingest does. The real :class:`Collector` then serves it on
127.0.0.1 (``http_port=0``, embedded nats-server), with its bootstrap admin token.

1. REST: each list endpoint is called by ``--concurrency`` keep-alive aiohttp clients for
   ``--http-seconds`` (at most ``--http-requests`` requests); then a bare aiohttp app in this
   process returns the very bytes the collector returned for the same URL, under the same load.
   Latency p50/p99 and the ratio to bare are printed.
2. Live: ``--clients`` WebSockets (``--fleet-clients`` on the fleet scope, the rest on one site
   each: 40 on the big venue, the others spread over theatres and small venues) authenticate and
   subscribe. Channel deltas (a transmitter's battery) are then published at ``--rate`` deltas/s
   for ``--ws-seconds`` by another process, as the agents would (msgpack envelopes on their
   JetStream subjects with ``Nats-Msg-Id``), into the collector's nats-server; the collector's
   own IngestConsumer applies them and its after-commit hook feeds the live WebSocket. Each delta
   carries a unique marker in ``runtime_min``; a client's latency for a delta is the time until
   it received that delta's marker or a newer one of the same channel (the live feed coalesces),
   measured from the time the delta was due to be published. A delta a client never saw by the
   end of ``--drain-seconds`` (after ingest caught up, at most 60 s) is lost. The collector sends
   what is queued for a client at one writer wake-up as one ``{"type": "batch", "items": [...]}``
   frame (a single message as itself); the clients unpack batches and time each item, so a
   delta's latency is that of the frame that carried it. The same messages are then fanned out by
   a bare aiohttp WebSocket server in this process (no NATS, no store: one ``orjson.dumps`` per
   delta, as the collector serializes, per-client queue and writer, clients indexed by site) to
   the same client mix; a bare client whose queue is full misses that message. To keep the
   comparison honest the bare writer coalesces the same way: everything in its queue at a
   wake-up goes out as one batch frame joined from the messages' bytes, with the collector's
   bounds (2,000 items, 1 MiB).

With ``--split`` the collector runs as two processes, as a deployment may: a second collector
process (``micboard-collector run``, same database and NATS) ingests, and the benchmarked one is
started with ``ingest=False`` and serves the live WebSocket only; committed changes reach it over
the live bridge (``micboard.live.v1.*``), and it reads the changed channels from the store.
Ingest progress is then the consumer's ack floor. ``--ingest-processes N`` runs N such ingesting
processes sharing the durable consumer (implies ``--split``; with SQLite they take turns at the
one write lock, so it is meant for ``--database postgres``, a fresh database on the server the
tests use, ``MICBOARD_TEST_PG_DSN``).

The clients run in a separate process so that their work does not queue behind the servers';
timestamps on both sides are ``time.monotonic_ns()`` (one system-wide clock on Linux).
Goals: p99 < 50 ms for a site's channels; delta-to-client p99 < 250 ms at 5,000 deltas/s.
Run: ``.venv/bin/python bench/api.py [--quick] [--split] [--ingest-processes N]
[--database sqlite|postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
from aiohttp import WSMsgType, web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.context import context_of
from micboard.collector.app import Collector, RunningCollector
from micboard.collector.ingest import IngestStats
from micboard.collector.services.alerts import AlertService, DeviceTransition
from micboard.collector.services.fleet import FleetView
from micboard.collector.services.sync import ApplyOutcome, SynchronizationService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.codec import encode
from micboard.shared.envelope import (
    AnyEvent,
    DeviceBody,
    DeviceEvent,
    HeartbeatBody,
    HeartbeatEvent,
    HelloBody,
    HelloEvent,
)
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor
from micboard.shared.natsd import free_port
from micboard.shared.subjects import build_subject, msg_id
from pg import scratch_database
from report import emit

BENCH = "api"
TOKEN = "mbt_bench-admin-token-0123456789abcdefghijklmnopqrstuvwxyz"
BOOT = "bench-boot"
#: Markers live in ``runtime_min`` above every seeded runtime, so a snapshot's values tell them apart.
MARKER_BASE = 1_000_000
SEED_BATCH = 500
HEARTBEAT_S = 60.0
BIG_SITE = "arena-main"
BIG_SITE_CLIENTS = 40
CHANNEL_PREFIX = '{"type":"channel"'
BATCH_PREFIX = '{"type":"batch"'
SNAPSHOT_PREFIX = '{"type":"snapshot"'
SITE_PREFIX = '{"type":"site"'
RUNTIME = re.compile(r'"runtime_min":(\d+)')
CLOSE_SLOW = 1013
#: The bounds of one batch frame, as the collector's live feed has them.
BATCH_MAX_ITEMS = 2_000
BATCH_MAX_BYTES = 1 << 20
BATCH_HEAD = b'{"type":"batch","items":['
BATCH_TAIL = b"]}"


# -- the fleet ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SitePlan:
    """One site: how many receivers of how many channels, under one agent."""

    site: str
    receivers: int
    channels: int

    @property
    def agent(self) -> str:
        """The site's agent."""
        return f"pi-{self.site}"


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """One seeded channel with a transmitter, and the battery it was seeded with."""

    site: str
    agent: str
    device_key: str
    index: int
    bars: int


def fleet_layout() -> list[SitePlan]:
    """16,000 channels: a 320-channel venue, 19 theatres of 80 channels, 885 venues of 16."""
    plans = [SitePlan(BIG_SITE, 80, 4)]
    plans += [SitePlan(f"theatre-{i:02d}", 20, 4) for i in range(19)]
    plans += [SitePlan(f"venue-{i:04d}", 4, 4) for i in range(885)]
    return plans


def make_receiver(key: str, channels: int, rng: random.Random) -> Device:
    """A 4-channel receiver; mostly full batteries, a few low ones, about 8 % without transmitter."""
    built = []
    for c in range(1, channels + 1):
        bars = rng.choices([5, 4, 3, 2, 1, -1], weights=[55, 25, 8, 3, 1, 8])[0]
        tx = None
        if bars >= 0:
            tx = Transmitter(
                model="ULXD2", battery_bars=bars, battery_percent=bars * 20, runtime_min=bars * 90,
                battery_type="LION", muted=False,
            )  # fmt: skip
        built.append(
            ReceiverChannel(
                index=c,
                name=f"HH{c:02d} Person {rng.randrange(1000)}",
                frequency_khz=470_000 + rng.randrange(2000) * 25,
                group_channel=f"1,{c}",
                transmitter=tx,
            )
        )
    return Device(
        device_key=key, vendor=Vendor.SHURE, family=Family.ULXD, model="ULXD4Q", name=key.upper(),
        address="10.0.0.1", port=2202, firmware="2.7.10", channels=tuple(built),
    )  # fmt: skip


@dataclass(slots=True)
class Seeded:
    """What the seeding left: channels with transmitters, the next seq of each agent, counts."""

    channels: list[ChannelRef]
    seqs: dict[str, int]
    total_channels: int
    devices: int
    alerts: int
    seconds: float


async def seed(engine: AsyncEngine, plans: Sequence[SitePlan], rng: random.Random) -> Seeded:
    """Apply hello and snapshot events through SynchronizationService, evaluating alerts as ingest does."""
    started = time.perf_counter()
    sync = SynchronizationService()
    alerts = AlertService(engine)
    seqs: dict[str, int] = {}
    refs: list[ChannelRef] = []
    pending: list[tuple[AnyEvent, Device | None]] = []
    total = devices = opened = 0

    def seq(agent: str) -> int:
        seqs[agent] = seqs.get(agent, 0) + 1
        return seqs[agent]

    async def flush() -> int:
        now = time.time_ns() // 1_000_000
        async with engine.begin() as conn:
            results = await sync.apply_batch(conn, [event for event, _ in pending])
            bad = [r for r in results if r.outcome is not ApplyOutcome.APPLIED]
            if bad:
                raise SystemExit(f"seeding failed: {bad[:3]}")
            count = 0
            for event, device in pending:
                if device is None:
                    continue
                change = DeviceTransition(
                    event.site, event.agent, device.device_key, None, device, None, "online"
                )
                count += len(await alerts.evaluate_device(conn, change, now_ms=now))
        pending.clear()
        return count

    for plan in plans:
        now = time.time_ns() // 1_000_000
        hello = HelloBody(version="bench", hostname=f"{plan.agent}.local")
        pending.append(
            (
                HelloEvent(
                    site=plan.site, agent=plan.agent, boot=BOOT, seq=seq(plan.agent), ts=now, body=hello
                ),
                None,
            )
        )
        for r in range(plan.receivers):
            device = make_receiver(f"rx-{r:02d}", plan.channels, rng)
            devices += 1
            total += len(device.channels)
            refs += [
                ChannelRef(
                    plan.site, plan.agent, device.device_key, ch.index, ch.transmitter.battery_bars or 0
                )
                for ch in device.channels
                if ch.transmitter is not None
            ]
            body = DeviceBody(device_key=device.device_key, snapshot=device)
            event = DeviceEvent(
                site=plan.site, agent=plan.agent, boot=BOOT, seq=seq(plan.agent), ts=now, body=body
            )
            pending.append((event, device))
        if len(pending) >= SEED_BATCH:
            opened += await flush()
    if pending:
        opened += await flush()
    await heartbeats(engine, plans, seqs)
    return Seeded(refs, seqs, total, devices, opened, time.perf_counter() - started)


async def heartbeats(engine: AsyncEngine, plans: Sequence[SitePlan], seqs: dict[str, int]) -> None:
    """One heartbeat per agent (every minute, as configured), so that no agent goes stale mid-run."""
    now = time.time_ns() // 1_000_000
    events: list[AnyEvent] = []
    for plan in plans:
        seqs[plan.agent] += 1
        body = HeartbeatBody(
            interval_s=HEARTBEAT_S, uptime_s=3600.0, devices_by_state={"online": plan.receivers}
        )
        events.append(
            HeartbeatEvent(
                site=plan.site, agent=plan.agent, boot=BOOT, seq=seqs[plan.agent], ts=now, body=body
            )
        )
    async with engine.begin() as conn:
        await SynchronizationService().apply_batch(conn, events)


# -- measuring helpers --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


# -- REST ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLoad:
    """One load run: GET ``url`` from ``concurrency`` clients for ``seconds`` or ``requests``."""

    url: str
    headers: dict[str, str]
    concurrency: int
    seconds: float
    requests: int
    warmup: int = 20


def http_worker(load: HttpLoad) -> list[float]:
    """In a child process: the latencies (ms) of the load run."""
    return asyncio.run(_http_load(load))


async def _http_load(load: HttpLoad) -> list[float]:
    connector = aiohttp.TCPConnector(limit=load.concurrency, force_close=False)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get() -> float:
            started = time.perf_counter()
            async with session.get(load.url, headers=load.headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{load.url}: HTTP {response.status}")
            return (time.perf_counter() - started) * 1000

        for _ in range(load.warmup):
            await get()
        deadline = time.perf_counter() + load.seconds

        async def client() -> None:
            while len(latencies) < load.requests and time.perf_counter() < deadline:
                latencies.append(await get())

        await asyncio.gather(*(client() for _ in range(load.concurrency)))
    return latencies


def bare_http_app(bodies: dict[str, bytes]) -> web.Application:
    """A bare aiohttp app answering each recorded path and query with the collector's bytes."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.path_qs], content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on 127.0.0.1 at a free port; returns the runner and its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A list endpoint under test; ``goal_ms`` is the p99 goal, if it has one."""

    label: str
    path: str
    goal_ms: float | None = None


async def bench_rest(
    pool: ProcessPoolExecutor, collector_url: str, endpoints: Sequence[Endpoint], args: argparse.Namespace
) -> None:
    """Load each endpoint on the collector, then on a bare app with the same bytes; print and emit."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bodies: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for endpoint in endpoints:
            async with session.get(collector_url + endpoint.path, headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise SystemExit(f"{endpoint.path}: HTTP {response.status}: {body[:300]!r}")
                bodies[endpoint.path] = body
    runner, bare_url = await start_app(bare_http_app(bodies))
    loop = asyncio.get_running_loop()
    print(
        f"\nREST: {args.concurrency} concurrent keep-alive clients, {args.http_seconds:g} s or "
        f"{args.http_requests} requests per endpoint and server"
    )
    print(
        f"{'endpoint':<44} {'items':>5} {'bytes':>9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'bare p50':>8} {'bare p99':>8} {'x p50':>6} {'x p99':>6}"
    )
    try:
        for endpoint in endpoints:
            figures: dict[str, tuple[float, float, float]] = {}
            for name, base in (("collector", collector_url), ("bare", bare_url)):
                load = HttpLoad(
                    base + endpoint.path, headers, args.concurrency, args.http_seconds, args.http_requests
                )
                started = time.perf_counter()
                latencies = await loop.run_in_executor(pool, http_worker, load)
                elapsed = time.perf_counter() - started
                figures[name] = (
                    percentile(latencies, 0.50), percentile(latencies, 0.99), len(latencies) / elapsed
                )  # fmt: skip
            p50, p99, rps = figures["collector"]
            b50, b99, _ = figures["bare"]
            items = len(json.loads(bodies[endpoint.path]).get("items", []))
            print(
                f"{endpoint.label:<44} {items:>5} {len(bodies[endpoint.path]):>9,} {rps:>7,.0f} {p50:>7.1f} "
                f"{p99:>7.1f} {b50:>8.2f} {b99:>8.2f} {p50 / b50:>6.1f} {p99 / b99:>6.1f}"
            )
            goal = f"< {endpoint.goal_ms:g}" if endpoint.goal_ms is not None else ""
            emit(BENCH, f"{endpoint.label} p50", round(p50, 2), "ms")
            emit(BENCH, f"{endpoint.label} p99", round(p99, 2), "ms", goal)
            emit(BENCH, f"{endpoint.label} p99 / bare", round(p99 / b99, 1), "x")
    finally:
        await runner.cleanup()


# -- live WebSocket: clients (child process) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """What a client subscribes to: the fleet (``site`` None) or one site."""

    site: str | None

    def message(self) -> dict[str, str]:
        """The subscribe request."""
        if self.site is None:
            return {"type": "subscribe", "scope": "fleet"}
        return {"type": "subscribe", "scope": "site", "site": self.site}


@dataclass(frozen=True, slots=True)
class WsLoad:
    """The client side of one fan-out run."""

    url: str
    token: str
    scopes: tuple[Scope, ...]
    ready_file: str
    stop_file: str
    max_seconds: float


@dataclass(slots=True)
class ClientResult:
    """What one client saw: ``(marker, monotonic ns)`` pairs and counters (messages, frames)."""

    scope: Scope
    markers: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    messages: int = 0
    frames: int = 0
    batches: int = 0
    snapshots: int = 0
    sites: int = 0
    error: str | None = None
    closed_by_server: int | None = None


def ws_worker(load: WsLoad) -> list[ClientResult]:
    """In a child process: connect, subscribe and record every client until told to stop."""
    return asyncio.run(_ws_clients(load))


def _record_batch(result: ClientResult, text: str, now: int) -> None:
    """A ``batch`` frame: each item counted as the message it is, every delta timed at ``now``."""
    items = orjson.loads(text)["items"]
    result.batches += 1
    result.messages += len(items)
    for item in items:
        kind = item["type"]
        if kind == "channel":
            tx = item["item"].get("tx") or {}
            marker = tx.get("runtime_min")
            if isinstance(marker, int) and marker >= MARKER_BASE:
                result.markers.append(marker - MARKER_BASE)
                result.received_ns.append(now)
        elif kind == "site":
            result.sites += 1


def _record_snapshot(result: ClientResult, text: str, now: int) -> None:
    for match in RUNTIME.finditer(text):
        marker = int(match.group(1))
        if marker >= MARKER_BASE:
            result.markers.append(marker - MARKER_BASE)
            result.received_ns.append(now)


async def _ws_clients(load: WsLoad) -> list[ClientResult]:
    results = [ClientResult(scope) for scope in load.scopes]
    subscribed = 0
    settled = 0
    all_settled = asyncio.Event()
    stopping = False
    connect_gate = asyncio.Semaphore(16)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    # limit=0: every WebSocket holds a connection, and the default pool stops at 100.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        def settle() -> None:
            nonlocal settled
            settled += 1
            if settled == len(results):
                all_settled.set()

        async def client(result: ClientResult) -> None:
            nonlocal subscribed
            try:
                async with connect_gate:
                    ws = await session.ws_connect(load.url, max_msg_size=0, autoping=True)
                    await ws.send_json({"type": "auth", "token": load.token})
                    await ws.send_json(result.scope.message())
                    first = await asyncio.wait_for(ws.receive(), 120)
                    if first.type is not WSMsgType.TEXT or not first.data.startswith(SNAPSHOT_PREFIX):
                        raise RuntimeError(f"no snapshot: {first.type} {str(first.data)[:200]}")
                subscribed += 1
                settle()
            except Exception as exc:  # noqa: BLE001 - one client failing is reported, not fatal
                result.error = f"{type(exc).__name__}: {exc}"
                settle()
                return
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                now = time.monotonic_ns()
                text: str = msg.data
                result.frames += 1
                if text.startswith(BATCH_PREFIX):
                    _record_batch(result, text, now)
                    continue
                result.messages += 1
                if text.startswith(CHANNEL_PREFIX):
                    match = RUNTIME.search(text)
                    if match is not None and (marker := int(match.group(1))) >= MARKER_BASE:
                        result.markers.append(marker - MARKER_BASE)
                        result.received_ns.append(now)
                elif text.startswith(SNAPSHOT_PREFIX):
                    result.snapshots += 1
                    _record_snapshot(result, text, now)
                elif text.startswith(SITE_PREFIX):
                    result.sites += 1
            if not stopping:
                result.closed_by_server = ws.close_code

        tasks = [asyncio.create_task(client(r)) for r in results]
        if not results:
            all_settled.set()
        deadline = time.monotonic() + load.max_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_settled.wait(), max(1.0, deadline - time.monotonic()))
        errors = [r.error for r in results if r.error is not None]
        state = {
            "subscribed": subscribed,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }
        await asyncio.to_thread(Path(load.ready_file).write_text, json.dumps(state))
        while time.monotonic() < deadline:
            if await asyncio.to_thread(Path(load.stop_file).exists):
                break
            await asyncio.sleep(0.05)
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


# -- live WebSocket: the servers' side ----------------------------------------------------------


def client_scopes(clients: int, fleet_clients: int, plans: Sequence[SitePlan]) -> tuple[Scope, ...]:
    """``fleet_clients`` on the fleet; then 40 on the big venue; the rest round-robin over other sites."""
    scopes = [Scope(None)] * min(fleet_clients, clients)
    big = min(BIG_SITE_CLIENTS, clients - len(scopes))
    scopes += [Scope(BIG_SITE)] * big
    theatres = [p.site for p in plans if p.site != BIG_SITE and p.receivers > 4]
    venues = [p.site for p in plans if p.receivers <= 4]
    # Three desks per theatre, then one per small venue.
    rest = clients - len(scopes)
    desks = min(rest, 3 * len(theatres))
    scopes += [Scope(theatres[i % len(theatres)]) for i in range(desks)]
    scopes += [Scope(venues[i % len(venues)]) for i in range(rest - desks)]
    return tuple(scopes)


@dataclass(frozen=True, slots=True)
class Deltas:
    """The deltas of one fan-out run: marker ``m`` changes ``refs[channel[m]]``."""

    events: list[DeviceEvent]
    channel: list[int]
    transmitters: list[dict[str, Any]]
    refs: list[ChannelRef]
    rate: float


def build_deltas(seeded: Seeded, rate: float, seconds: float, rng: random.Random) -> Deltas:
    """One battery delta per marker, visiting the channels with transmitters in a shuffled round robin."""
    order = list(range(len(seeded.channels)))
    rng.shuffle(order)
    count = int(rate * seconds)
    events: list[DeviceEvent] = []
    channel: list[int] = []
    transmitters: list[dict[str, Any]] = []
    now = time.time_ns() // 1_000_000
    for m in range(count):
        k = order[m % len(order)]
        ref = seeded.channels[k]
        seeded.seqs[ref.agent] += 1
        tx = {
            "model": "ULXD2", "battery_bars": ref.bars, "battery_percent": min(100, ref.bars * 20 + m % 7),
            "runtime_min": MARKER_BASE + m, "battery_type": "LION", "muted": False,
        }  # fmt: skip
        body = DeviceBody(device_key=ref.device_key, changes={"channels": {ref.index: {"transmitter": tx}}})
        events.append(
            DeviceEvent(
                site=ref.site, agent=ref.agent, boot=BOOT, seq=seeded.seqs[ref.agent], ts=now, body=body
            )
        )
        channel.append(k)
        transmitters.append(tx)
    return Deltas(events, channel, transmitters, seeded.channels, rate)


Sink = Callable[[int, int], Any]
"""Called with (first marker, end marker) of a batch that is due; may be a coroutine function."""


async def drive(deltas: Deltas, tick_s: float, max_batch: int, sink: Sink) -> tuple[list[int], float]:
    """Hand the deltas to ``sink`` in batches at ``deltas.rate``; returns scheduled times and seconds.

    A delta's time is when it was due, so a sink that falls behind shows up as latency.
    """
    n = len(deltas.events)
    interval_ns = 1e9 / deltas.rate
    start = time.monotonic_ns() + 50_000_000
    scheduled = [start + int(m * interval_ns) for m in range(n)]
    done = 0
    while done < n:
        now = time.monotonic_ns()
        due = min(n, bisect.bisect_right(scheduled, now), done + max_batch)
        if due <= done:
            await asyncio.sleep(max(tick_s, (scheduled[done] - now) / 1e9))
            continue
        result = sink(done, due)
        if asyncio.iscoroutine(result):
            await result
        done = due
        if time.monotonic_ns() < scheduled[min(done, n - 1)]:
            await asyncio.sleep(tick_s)
    return scheduled, (time.monotonic_ns() - start) / 1e9


@dataclass(frozen=True, slots=True)
class PublishLoad:
    """What the agents' side publishes: ``(subject, payload, msg id)`` at ``rate`` per second."""

    nats_url: str
    messages: list[tuple[str, bytes, str]]
    rate: float
    in_flight: int
    start_delay_s: float = 0.2


def publish_worker(load: PublishLoad) -> tuple[int, float]:
    """In a child process: publish to JetStream on schedule; returns (first due time ns, seconds)."""
    return asyncio.run(_publish(load))


async def _publish(load: PublishLoad) -> tuple[int, float]:
    # One reply subscription for every ack, as many agents' publishes would look to the server,
    # instead of nats-py's per-publish future and timer: the same messages and acks, at a
    # fraction of the CPU, which on a shared 2-core machine is taken from the collector measured.
    nc = await nats.connect(load.nats_url, name="bench-agents")
    gate = asyncio.Semaphore(load.in_flight)
    failures: list[str] = []
    acked = 0
    done = asyncio.Event()
    n = len(load.messages)
    prefix = nc.new_inbox()

    async def on_ack(msg: Msg) -> None:
        nonlocal acked
        # A stored message is acked with its stream and sequence; "no responders" comes empty.
        if not msg.data or b'"error"' in msg.data:
            failures.append(msg.data.decode(errors="replace")[:200] or f"no ack: {msg.headers}")
        acked += 1
        gate.release()
        if acked == n:
            done.set()

    await nc.subscribe(prefix + ".*", cb=on_ack)
    interval_ns = 1e9 / load.rate
    start = time.monotonic_ns() + int(load.start_delay_s * 1e9)
    sent = 0
    while sent < n:
        due = min(n, int((time.monotonic_ns() - start) / interval_ns) + 1)
        if due <= sent:
            await asyncio.sleep(0.001)
            continue
        for i in range(sent, due):
            subject, payload, mid = load.messages[i]
            await gate.acquire()
            await nc.publish(subject, payload, reply=f"{prefix}.{i}", headers={"Nats-Msg-Id": mid})
        sent = due
    if n:
        await asyncio.wait_for(done.wait(), 60)
    elapsed = (time.monotonic_ns() - start) / 1e9
    await nc.close()
    if failures:
        raise RuntimeError(f"{len(failures)} publishes failed, first: {failures[0]!r}")
    return start, elapsed


def encoded(deltas: Deltas) -> list[tuple[str, bytes, str]]:
    """Each delta as its agent would publish it: subject, msgpack envelope, ``Nats-Msg-Id``."""
    return [
        (build_subject(e.site, e.agent, e.kind), encode(e), msg_id(e.agent, e.boot, e.seq))
        for e in deltas.events
    ]


@dataclass(eq=False, slots=True)
class _BareClient:
    ws: web.WebSocketResponse
    queue: asyncio.Queue[bytes]


class BareFanOut:
    """A bare WebSocket fan-out: subscribe, then the same channel messages; no store, no auth check."""

    def __init__(self, templates: dict[int, dict[str, Any]], deltas: Deltas) -> None:
        self.templates = templates
        self.deltas = deltas
        self.fleet: set[_BareClient] = set()
        self.by_site: dict[str, set[_BareClient]] = defaultdict(set)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """Auth (ignored), subscribe, an empty snapshot, then whatever is fanned out."""
        ws = web.WebSocketResponse(max_msg_size=4096)
        await ws.prepare(request)
        client = _BareClient(ws, asyncio.Queue(maxsize=512))
        writer: asyncio.Task[None] | None = None
        joined: set[_BareClient] | None = None
        try:
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("type") != "subscribe":
                    continue
                joined = self.fleet if data["scope"] == "fleet" else self.by_site[data["site"]]
                await ws.send_frame(
                    orjson.dumps({"type": "snapshot", "channels": [], "sites": []}), WSMsgType.TEXT
                )
                joined.add(client)
                writer = asyncio.create_task(self._write(client))
        finally:
            if joined is not None:
                joined.discard(client)
            if writer is not None:
                writer.cancel()
        return ws

    @staticmethod
    async def _write(client: _BareClient) -> None:
        # As the collector's writer: what is queued at a wake-up goes out as one frame.
        queue = client.queue
        while True:
            items = [await queue.get()]
            size = len(BATCH_HEAD) + len(BATCH_TAIL) + len(items[0]) + 1
            while not queue.empty() and len(items) < BATCH_MAX_ITEMS:
                # asyncio.Queue cannot be peeked: a frame may pass the byte bound by one message.
                item = queue.get_nowait()
                items.append(item)
                size += len(item) + 1
                if size > BATCH_MAX_BYTES:
                    break
            frame = items[0] if len(items) == 1 else BATCH_HEAD + b",".join(items) + BATCH_TAIL
            await client.ws.send_frame(frame, WSMsgType.TEXT)

    def send(self, first: int, end: int) -> None:
        """Build each due delta's channel message once and queue it for every client that wants it."""
        now = time.time_ns() // 1_000_000
        for m in range(first, end):
            k = self.deltas.channel[m]
            ref = self.deltas.refs[k]
            tx = self.deltas.transmitters[m]
            template = self.templates[k]
            item = {**template, "tx": {**template["tx"], **tx}, "updated_ms": now}
            text = orjson.dumps({"type": "channel", "item": item})
            for client in (*self.fleet, *self.by_site.get(ref.site, ())):
                if client.queue.full():
                    continue  # counted as lost by the analysis, as a dropped client would be
                client.queue.put_nowait(text)

    def count(self) -> int:
        """Subscribed clients."""
        return len(self.fleet) + sum(len(s) for s in self.by_site.values())


# -- live WebSocket: analysis -------------------------------------------------------------------


@dataclass(slots=True)
class FanOutFigures:
    """Delta-to-client figures over every (client, delta in its scope) pair."""

    latencies_ms: list[float]
    fleet_ms: list[float]
    site_ms: list[float]
    pairs: int
    exact: int
    lost: int
    messages: int
    frames: int
    batches: int
    snapshots: int
    dropped_clients: int
    failed_clients: int
    # Latencies by the second of the run each delta was due in: growth or one bad second shows.
    by_second: dict[int, list[float]] = field(default_factory=dict)


def analyse(results: Sequence[ClientResult], deltas: Deltas, scheduled: Sequence[int]) -> FanOutFigures:
    """Match what each client received against the deltas in its scope."""
    by_site: dict[str, list[int]] = defaultdict(list)
    for m, k in enumerate(deltas.channel):
        by_site[deltas.refs[k].site].append(m)
    everything = list(range(len(deltas.channel)))
    figures = FanOutFigures([], [], [], 0, 0, 0, 0, 0, 0, 0, 0, 0)
    for result in results:
        if result.error is not None:
            figures.failed_clients += 1
            continue
        figures.messages += result.messages
        figures.frames += result.frames
        figures.batches += result.batches
        figures.snapshots += max(0, result.snapshots)
        if result.closed_by_server is not None:
            figures.dropped_clients += 1
        seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for marker, at in zip(result.markers, result.received_ns, strict=True):
            if marker < len(deltas.channel):
                seen[deltas.channel[marker]].append((marker, at))
        index: dict[int, tuple[list[int], list[int]]] = {}
        for k, pairs in seen.items():
            pairs.sort()
            # Earliest arrival of this marker or any newer one of the channel.
            earliest = [p[1] for p in pairs]
            for i in range(len(earliest) - 2, -1, -1):
                earliest[i] = min(earliest[i], earliest[i + 1])
            index[k] = ([p[0] for p in pairs], earliest)
        wanted = everything if result.scope.site is None else by_site.get(result.scope.site, [])
        bucket = figures.fleet_ms if result.scope.site is None else figures.site_ms
        for m in wanted:
            figures.pairs += 1
            entry = index.get(deltas.channel[m])
            if entry is None:
                figures.lost += 1
                continue
            markers, earliest = entry
            i = bisect.bisect_left(markers, m)
            if i == len(markers):
                figures.lost += 1
                continue
            if markers[i] == m:
                figures.exact += 1
            latency = (earliest[i] - scheduled[m]) / 1e6
            figures.latencies_ms.append(latency)
            bucket.append(latency)
            figures.by_second.setdefault(int(m / deltas.rate), []).append(latency)
    return figures


async def wait_for_file(path: Path, seconds: float) -> dict[str, Any]:
    """The JSON a child writes into ``path``, waiting at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline:
            raise SystemExit(f"clients not ready within {seconds:g} s")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.05)
    data: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
    return data


Feed = Callable[[], Awaitable[tuple[list[int], float]]]
"""Sends every delta; returns each delta's scheduled time (monotonic ns) and the seconds it took."""


async def fan_out_run(
    pool: ProcessPoolExecutor,
    tmp: Path,
    name: str,
    url: str,
    scopes: tuple[Scope, ...],
    deltas: Deltas,
    feed: Feed,
    drain_s: float,
) -> tuple[FanOutFigures, float, float]:
    """Connect the clients, ``feed`` the deltas, drain, collect; returns figures, rate, subscribe s."""
    ready, stop = tmp / f"{name}.ready", tmp / f"{name}.stop"
    load = WsLoad(
        url, TOKEN, scopes, str(ready), str(stop), max_seconds=len(deltas.events) / deltas.rate + 600
    )
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    clients = loop.run_in_executor(pool, ws_worker, load)
    try:
        state = await wait_for_file(ready, 300)
        subscribe_s = time.perf_counter() - started
        if state["errors"]:
            print(f"  {name}: {state['errors']} clients failed to subscribe; first: {state['first_error']}")
        scheduled, seconds = await feed()
        await asyncio.sleep(drain_s)
    finally:
        await asyncio.to_thread(stop.write_text, "stop")
    results = await clients
    return analyse(results, deltas, scheduled), len(deltas.events) / seconds, subscribe_s


Progress = Callable[[], Awaitable[int]]
"""How many events ingest has applied so far (a counter that only grows)."""


def ingest_progress(
    running: RunningCollector, settings: CollectorSettings, js: JetStreamContext | None
) -> Progress:
    """Events fetched by the collector's own ingest, or else acknowledged on the consumer (``js``)."""
    ingest = running.ingest
    if ingest is not None:

        async def fetched() -> int:
            return ingest.stats.events

        return fetched
    assert js is not None, "a collector without ingest needs the consumer's ack floor"
    consumer = js

    async def acked() -> int:
        info = await consumer.consumer_info(settings.stream_name, settings.durable_name)
        return int(info.ack_floor.consumer_seq if info.ack_floor else 0)

    return acked


class GcPauses:
    """The garbage collector's collections in this process while in use (``with GcPauses() as g``)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, ms)
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self._started) * 1000))

    def describe(self) -> str:
        """``N collections (gen0 a, gen1 b, gen2 c), T ms in all, longest L ms``."""
        by_gen = [sum(1 for g, _ms in self.pauses if g == gen) for gen in range(3)]
        total = sum(ms for _g, ms in self.pauses)
        longest = max((ms for _g, ms in self.pauses), default=0.0)
        return (
            f"{len(self.pauses)} collections (gen0 {by_gen[0]}, gen1 {by_gen[1]}, gen2 {by_gen[2]}), "
            f"{total:,.0f} ms in all, longest {longest:,.1f} ms"
        )


def collector_feed(
    pool: ProcessPoolExecutor,
    nats_url: str,
    progress: Progress,
    deltas: Deltas,
    in_flight: int,
    ingest: IngestStats | None = None,
) -> Feed:
    """Publish the deltas into JetStream from another process and wait until ingest applied them all.

    With the stats of an ``ingest`` in this process, its batches over the phase are described too.
    """
    messages = encoded(deltas)

    async def feed() -> tuple[list[int], float]:
        before = await progress()
        batches_before = replace(ingest) if ingest is not None else None
        load = PublishLoad(nats_url, messages, deltas.rate, in_flight)
        # Every collection stops this process's event loop, ingest and live feed alike.
        with GcPauses() as collections:
            start, seconds = await asyncio.get_running_loop().run_in_executor(pool, publish_worker, load)
            interval_ns = 1e9 / deltas.rate
            published = time.monotonic()
            while (done := await progress() - before) < len(messages):
                if time.monotonic() - published > 60:
                    print(f"  ingest applied only {done:,} of {len(messages):,}")
                    break
                await asyncio.sleep(0.01)
        lag = time.monotonic() - published
        # Ingest's own rate over the phase: below the publishing rate, a backlog grew.
        applied = done / (seconds + lag)
        print(
            f"  published at {len(messages) / seconds:,.0f}/s; ingest done {lag:.2f} s after the last ack "
            f"(applied {applied:,.0f}/s over the phase)"
        )
        if ingest is not None and batches_before is not None:
            batches = ingest.batches - batches_before.batches
            busy_s = ingest.batch_seconds - batches_before.batch_seconds
            events = ingest.events - batches_before.events
            print(
                f"  ingest: {batches:,} batches of {events / max(batches, 1):,.0f} events on average, "
                f"{1000 * busy_s / max(batches, 1):,.1f} ms each; applying batches "
                f"{busy_s / (seconds + lag):.0%} of the phase"
            )
        print(f"  garbage collector in this process over the phase: {collections.describe()}")
        return [start + int(m * interval_ns) for m in range(len(messages))], seconds

    return feed


def print_fan_out(name: str, figures: FanOutFigures, rate: float, subscribe_s: float, seconds: float) -> None:
    """One block of fan-out figures."""
    lat = figures.latencies_ms
    p50, p99, worst = percentile(lat, 0.5), percentile(lat, 0.99), max(lat, default=float("nan"))
    fleet99, site99 = percentile(figures.fleet_ms, 0.99), percentile(figures.site_ms, 0.99)
    coalesced = figures.pairs - figures.exact - figures.lost
    print(
        f"  {name:<9} subscribed in {subscribe_s:5.1f} s; drove {rate:,.0f} deltas/s; "
        f"{figures.messages / seconds:,.0f} messages/s to clients in {figures.frames / seconds:,.0f} "
        f"frames/s ({figures.batches:,} batches)"
    )
    print(
        f"            delta-to-client p50 {p50:8.1f} ms  p99 {p99:8.1f} ms  max {worst:8.1f} ms   "
        f"(fleet clients p99 {fleet99:.1f} ms, site clients p99 {site99:.1f} ms)"
    )
    print(
        f"            {figures.pairs:,} (client, delta) pairs: {figures.exact:,} seen as sent, "
        f"{coalesced:,} coalesced into a newer one, {figures.lost:,} lost; "
        f"{figures.dropped_clients} clients dropped, {figures.failed_clients} failed, "
        f"{figures.snapshots} resync snapshots"
    )
    seconds_p99 = [f"{percentile(figures.by_second[s], 0.99):.0f}" for s in sorted(figures.by_second)]
    print(f"            p99 ms by second of the run: {' '.join(seconds_p99)}")


async def channel_templates(engine: AsyncEngine, refs: Sequence[ChannelRef]) -> dict[int, dict[str, Any]]:
    """The collector's own channel item of every channel with a transmitter, by ``refs`` index."""
    items = await FleetView(engine).channels_where()
    by_key = {(i["agent"], i["device_key"], i["index"]): i for i in items}
    return {k: by_key[(r.agent, r.device_key, r.index)] for k, r in enumerate(refs)}


async def bench_live(
    pool: ProcessPoolExecutor,
    tmp: Path,
    running: RunningCollector,
    progress: Progress,
    seeded: Seeded,
    plans: Sequence[SitePlan],
    args: argparse.Namespace,
) -> None:
    """Fan-out through NATS, ingest and the collector's live feed, then through a bare server."""
    rng = random.Random(7)
    scopes = client_scopes(args.clients, args.fleet_clients, plans)
    templates = await channel_templates(running.engine, seeded.channels)
    await heartbeats(running.engine, plans, seeded.seqs)
    deltas = build_deltas(seeded, args.rate, args.ws_seconds, rng)
    fleet_n = sum(s.site is None for s in scopes)
    big_n = sum(s.site == BIG_SITE for s in scopes)
    print(
        f"\nLive: {len(scopes)} WebSocket clients ({fleet_n} fleet, {big_n} on {BIG_SITE}, "
        f"{len(scopes) - fleet_n - big_n} on other sites); {len(deltas.events):,} battery deltas "
        f"at {args.rate:,.0f}/s for {args.ws_seconds:g} s, {args.drain_seconds:g} s to drain"
    )
    if args.split:
        print(
            "  collector: agents' events -> JetStream -> IngestConsumer (ingest process) -> store -> "
            "live bridge -> live feed (this process) -> WebSocket"
        )
    else:
        print("  collector: agents' events -> JetStream -> IngestConsumer -> store -> live feed -> WebSocket")
    ws_url = running.url.replace("http://", "ws://") + "/api/v1/live"
    live = context_of(running.runner.app).live
    assert live is not None
    ingest_stats = running.ingest.stats if running.ingest is not None else None
    feed = collector_feed(pool, running.nats_url, progress, deltas, args.in_flight, ingest_stats)
    # The deltas, their encoded messages and the templates (hundreds of thousands of objects) are
    # the benchmark's, made in the collector's process just now: young, the garbage collector's
    # first collections of the phase would walk them all (a pause of 100-150 ms that a collector
    # in service never has). Collected once here, they are old, as long-lived data is.
    gc.collect()
    figures, rate, subscribe_s = await fan_out_run(
        pool, tmp, "collector", ws_url, scopes, deltas, feed, args.drain_seconds
    )
    seconds = args.ws_seconds + args.drain_seconds
    print_fan_out("collector", figures, rate, subscribe_s, seconds)
    stats = live.stats
    print(
        f"            live feed: {stats.messages:,} messages queued, {stats.frames:,} frames sent, "
        f"{stats.slow_dropped} slow clients "
        f"dropped, {stats.resyncs} resyncs, {stats.snapshots} snapshots"
    )
    print("  bare: in-process schedule -> one orjson.dumps per delta -> per-client queue -> WebSocket")
    bare = BareFanOut(templates, deltas)
    app = web.Application()
    app.router.add_get("/live", bare.handle)
    runner, bare_url = await start_app(app)

    async def bare_feed() -> tuple[list[int], float]:
        return await drive(deltas, args.tick_ms / 1000, args.max_batch, bare.send)

    try:
        bare_figures, bare_rate, bare_subscribe_s = await fan_out_run(
            pool, tmp, "bare", bare_url.replace("http://", "ws://") + "/live", scopes, deltas, bare_feed,
            args.drain_seconds,
        )  # fmt: skip
    finally:
        await runner.cleanup()
    print_fan_out("bare", bare_figures, bare_rate, bare_subscribe_s, seconds)
    p50, p99 = percentile(figures.latencies_ms, 0.5), percentile(figures.latencies_ms, 0.99)
    b99 = percentile(bare_figures.latencies_ms, 0.99)
    print(f"            collector / bare p99: {p99 / b99:.1f}x")
    emit(BENCH, "ws delta-to-client p50", round(p50, 1), "ms")
    emit(BENCH, "ws delta-to-client p99", round(p99, 1), "ms", f"< 250 at {args.rate:,.0f}/s")
    emit(BENCH, "ws site clients p99", round(percentile(figures.site_ms, 0.99), 1), "ms")
    emit(BENCH, "ws fleet clients p99", round(percentile(figures.fleet_ms, 0.99), 1), "ms")
    emit(BENCH, "ws deltas lost", figures.lost, "pairs", "0")
    emit(BENCH, "ws clients dropped", figures.dropped_clients + figures.failed_clients, "clients", "0")
    emit(BENCH, "ws published rate", round(rate), "deltas/s")
    emit(BENCH, "ws bare delta-to-client p99", round(b99, 1), "ms")
    emit(BENCH, "ws p99 / bare", round(p99 / b99, 1), "x")


@contextlib.asynccontextmanager
async def ingest_process(
    settings: CollectorSettings, nats_url: str, tmp: Path, number: int = 1
) -> AsyncIterator[None]:
    """``micboard-collector run`` in a process of its own, ingesting into ``settings``' database."""
    port = free_port()
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": nats_url,
        "MICBOARD_DATABASE_URL": settings.resolved_database_url(),
        "MICBOARD_STATE_DIR": str(tmp / f"ingest-{number}"),
        "MICBOARD_HTTP_HOST": "127.0.0.1",
        "MICBOARD_HTTP_PORT": str(port),
        "MICBOARD_STALE_CHECK_INTERVAL_S": str(settings.stale_check_interval_s),
        "MICBOARD_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "micboard.collector.cli", "run", env=env
    )
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                if process.returncode is not None:
                    raise SystemExit(f"the ingest process exited with {process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SystemExit("the ingest process was not healthy within 60 s")
                await asyncio.sleep(0.2)
        print(f"  ingest process {number} (pid {process.pid}) ready on port {port}")
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


# -- main ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    """Seed, start the collector, then the REST and live benchmarks."""
    plans = fleet_layout()
    rng = random.Random(42)
    async with contextlib.AsyncExitStack() as stack:
        tmp_name = stack.enter_context(tempfile.TemporaryDirectory(prefix="micboard-bench-api-"))
        pool = stack.enter_context(
            ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        )
        tmp = Path(tmp_name)
        database_url = None
        if args.database == "postgres":
            database_url = await stack.enter_async_context(scratch_database())
        settings = CollectorSettings(
            state_dir=tmp, http_host="127.0.0.1", http_port=0, bootstrap_token=SecretStr(TOKEN),
            stale_check_interval_s=3600.0, ingest=not args.split, database_url=database_url,
        )  # fmt: skip
        engine = create_engine(settings.resolved_database_url())
        try:
            await upgrade(engine)
            seeded = await seed(engine, plans, rng)
        finally:
            await engine.dispose()
        print(
            f"fleet: {len(plans)} sites, {seeded.devices:,} receivers, {seeded.total_channels:,} channels "
            f"({len(seeded.channels):,} with a transmitter), {seeded.alerts:,} alert changes; "
            f"seeded through SynchronizationService in {seeded.seconds:.1f} s, into {args.database}"
        )
        pool.submit(percentile, [0.0], 0.5).result()  # start the client process before measuring
        collector = Collector(settings)
        running = await collector.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                js = None
                if args.split:
                    for number in range(1, args.ingest_processes + 1):
                        await stack.enter_async_context(
                            ingest_process(settings, running.nats_url, tmp, number)
                        )
                    nc = await nats.connect(running.nats_url)
                    stack.push_async_callback(nc.close)
                    js = nc.jetstream()
                await run_phases(
                    pool, tmp, running, ingest_progress(running, settings, js), seeded, plans, args
                )
        finally:
            await collector.stop()


async def run_phases(
    pool: ProcessPoolExecutor,
    tmp: Path,
    running: RunningCollector,
    progress: Progress,
    seeded: Seeded,
    plans: Sequence[SitePlan],
    args: argparse.Namespace,
) -> None:
    """The REST phase, then the live phase, against the started collector."""
    small = next(p.site for p in plans if p.receivers == 4)
    endpoints = [
        Endpoint("GET /sites?limit=1000", "/api/v1/sites?limit=1000"),
        Endpoint(
            f"GET /channels?site={BIG_SITE}&limit=1000",
            f"/api/v1/channels?site={BIG_SITE}&limit=1000",
            50.0,
        ),
        Endpoint(f"GET /channels?site={small}", f"/api/v1/channels?site={small}", 50.0),
        Endpoint("GET /devices?limit=100", "/api/v1/devices?limit=100"),
        Endpoint("GET /alerts", "/api/v1/alerts"),
    ]
    if not args.skip_rest:
        await bench_rest(pool, running.url, endpoints, args)
    if not args.skip_live:
        await bench_live(pool, tmp, running, progress, seeded, plans, args)


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent REST clients")
    parser.add_argument("--http-seconds", type=float, default=5.0, help="per endpoint and server")
    parser.add_argument("--http-requests", type=int, default=5000, help="at most, per endpoint and server")
    parser.add_argument("--clients", type=int, default=200, help="WebSocket clients")
    parser.add_argument("--fleet-clients", type=int, default=10, help="of which subscribe to the whole fleet")
    parser.add_argument("--rate", type=float, default=5000.0, help="channel deltas per second")
    parser.add_argument("--ws-seconds", type=float, default=10.0, help="how long deltas are sent")
    parser.add_argument("--drain-seconds", type=float, default=3.0, help="wait after the last delta")
    parser.add_argument("--tick-ms", type=float, default=10.0, help="batching interval of the bare feed")
    parser.add_argument("--max-batch", type=int, default=256, help="largest bare batch")
    parser.add_argument("--in-flight", type=int, default=256, help="bound on unacknowledged publishes")
    parser.add_argument("--skip-rest", action="store_true")
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument(
        "--split", action="store_true", help="ingest in a second collector process; this one only serves"
    )
    parser.add_argument(
        "--ingest-processes",
        type=int,
        default=1,
        help="with --split (implied when above 1): how many collector processes ingest",
    )
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    if args.ingest_processes < 1:
        parser.error("--ingest-processes must be at least 1")
    args.split = args.split or args.ingest_processes > 1
    if args.quick:
        args.http_seconds, args.http_requests = 1.0, 500
        args.ws_seconds, args.drain_seconds = 3.0, 2.0
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
