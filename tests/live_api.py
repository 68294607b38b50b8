"""A live API on a real port: the collector's app, a real nats-server, a token per role."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
from aiohttp import web
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.app import create_app
from micboard.collector.api.auth import Role, TokenStore
from micboard.collector.live import LiveHub
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.commands import CommandService
from micboard.collector.services.devices import DeviceService
from micboard.collector.services.history import HistoryService
from micboard.collector.services.sync import SynchronizationService
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import DeviceBody, DeviceEvent, HelloBody, HelloEvent, OfflineBody, OfflineEvent
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def receiver(
    key: str,
    *,
    name: str | None = None,
    model: str = "ULXD4Q",
    vendor: Vendor = Vendor.SHURE,
    family: Family = Family.ULXD,
    bars: Sequence[int | None] = (5, 4),
    names: Sequence[str] | None = None,
) -> Device:
    """A receiver with one channel per entry of ``bars`` (None: no transmitter)."""
    channels = []
    for i, b in enumerate(bars, start=1):
        tx = (
            None
            if b is None
            else Transmitter(
                model="ULXD2",
                battery_bars=b,
                battery_percent=b * 20,
                runtime_min=b * 60,
                battery_type="LION",
                muted=False,
            )
        )
        label = names[i - 1] if names else f"HH{i:02d} Person{i}"
        channels.append(
            ReceiverChannel(
                index=i, name=label, frequency_khz=470_000 + i * 100, group_channel=f"1,{i}", transmitter=tx
            )
        )
    return Device(
        device_key=key,
        vendor=vendor,
        family=family,
        model=model,
        name=name or key.upper(),
        address="192.0.2.10",
        firmware="2.1",
        channels=tuple(channels),
    )


@dataclass
class Seeder:
    """Applies events through the real SynchronizationService, as ingest would."""

    engine: AsyncEngine
    seq: dict[str, int] = field(default_factory=dict)

    def _next(self, agent: str) -> int:
        self.seq[agent] = self.seq.get(agent, 0) + 1
        return self.seq[agent]

    async def devices(self, site: str, agent: str, devices: Sequence[Device]) -> None:
        events: list[Any] = []
        if agent not in self.seq:
            events.append(
                HelloEvent(
                    site=site,
                    agent=agent,
                    boot="b1",
                    seq=self._next(agent),
                    ts=now_ms(),
                    body=HelloBody(version="1.0", hostname=f"{agent}.local"),
                )
            )
        for device in devices:
            events.append(
                DeviceEvent(
                    site=site,
                    agent=agent,
                    boot="b1",
                    seq=self._next(agent),
                    ts=now_ms(),
                    body=DeviceBody(device_key=device.device_key, snapshot=device),
                )
            )
        await self._apply(events)

    async def offline(self, site: str, agent: str, device_key: str) -> None:
        await self._apply(
            [
                OfflineEvent(
                    site=site,
                    agent=agent,
                    boot="b1",
                    seq=self._next(agent),
                    ts=now_ms(),
                    body=OfflineBody(device_key=device_key),
                )
            ]
        )

    async def _apply(self, events: list[Any]) -> None:
        async with self.engine.begin() as conn:
            results = await SynchronizationService().apply_batch(conn, events)
        assert all(r.outcome.value == "applied" for r in results), results


@dataclass
class LiveApi:
    """The running app and a client session with a token per role."""

    url: str
    app: web.Application
    engine: AsyncEngine
    hub: LiveHub
    nc: Client
    tokens: dict[str, str]
    http: aiohttp.ClientSession
    seed: Seeder

    receiver = staticmethod(receiver)
    now_ms = staticmethod(now_ms)

    def auth(self, role: str | None) -> dict[str, str]:
        return {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}

    async def call(
        self, method: str, path: str, role: str | None = "viewer", **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {**self.auth(role), **kwargs.pop("headers", {})}
        async with self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs) as response:
            raw = await response.read()
            body: Any = None
            if raw and response.content_type in ("application/json", "application/problem+json"):
                body = await response.json(content_type=None)
            elif raw:
                body = raw.decode()
            return response.status, body, response

    async def get(self, path: str, role: str | None = "viewer", **params: Any) -> tuple[int, Any]:
        status, body, _ = await self.call("GET", path, role, params=params)
        return status, body


async def start_api(engine: AsyncEngine, nats_url: str, **settings: Any) -> AsyncIterator[LiveApi]:
    nc = await nats.connect(nats_url)
    hub = LiveHub()
    config = CollectorSettings(nats_url=nats_url, **settings)
    app = create_app(
        DeviceService(engine),
        settings=config,
        nc=nc,
        hub=hub,
        alerts=AlertService(engine, hub=hub),
        history=HistoryService(engine),
        commands=CommandService(engine, nc, timeout_s=1.0),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    store = TokenStore(engine)
    tokens = {}
    for role in Role:
        _record, tokens[role.value] = await store.create(f"test-{role.value}", role)
    async with aiohttp.ClientSession() as http:
        yield LiveApi(url, app, engine, hub, nc, tokens, http, Seeder(engine))
    await runner.cleanup()
    await nc.close()
