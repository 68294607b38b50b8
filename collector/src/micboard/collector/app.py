"""The collector process: NATS (embedded when none is configured), store, ingest and HTTP."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats
from aiohttp import web
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.app import create_app
from micboard.collector.ingest import IngestConsumer
from micboard.collector.services.devices import DeviceService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine, create_schema
from micboard.shared.natsd import EmbeddedNats

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunningCollector:
    """Handles of a started collector, for callers that need its address or its parts."""

    url: str
    nats_url: str
    engine: AsyncEngine
    ingest: IngestConsumer
    runner: web.AppRunner


class Collector:
    """Owns every part of a collector process and starts and stops them in order."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.embedded: EmbeddedNats | None = None
        self.running: RunningCollector | None = None
        self._nc: Client | None = None
        self._ingest_task: asyncio.Task[None] | None = None

    async def start(self) -> RunningCollector:
        """Start NATS (if embedded), the store, ingest and the HTTP server."""
        nats_url = self.settings.nats_url
        if nats_url is None:
            store = self.settings.state_dir / "nats"
            self.embedded = EmbeddedNats(store_dir=store)
            await asyncio.to_thread(self.embedded.start)
            nats_url = self.embedded.url
            log.info("embedded nats-server ready", extra={"nats": nats_url})
        engine = create_engine(self.settings.resolved_database_url())
        await create_schema(engine)
        self._nc = await nats.connect(
            servers=[nats_url], name="micboard-collector", max_reconnect_attempts=-1, reconnect_time_wait=1.0
        )
        ingest = IngestConsumer(self._nc, engine, self.settings)
        await ingest.start()
        self._ingest_task = asyncio.create_task(ingest.run(), name="ingest")
        runner = web.AppRunner(create_app(DeviceService(engine)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{self.settings.http_host}:{port}"
        self.running = RunningCollector(url, nats_url, engine, ingest, runner)
        log.info("collector ready", extra={"url": url, "nats": nats_url})
        return self.running

    async def stop(self) -> None:
        """Stop in reverse order: HTTP, ingest (finishing its batch), NATS, store."""
        running, self.running = self.running, None
        if running is not None:
            await running.runner.cleanup()
            running.ingest.stop()
        if self._ingest_task is not None:
            try:
                await asyncio.wait_for(self._ingest_task, timeout=self.settings.fetch_timeout_s + 5)
            except TimeoutError:
                self._ingest_task.cancel()
            self._ingest_task = None
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
        if running is not None:
            await running.engine.dispose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
