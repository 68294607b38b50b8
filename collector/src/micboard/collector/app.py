"""The collector process: NATS (embedded when none is configured), store, ingest and HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import nats
from aiohttp import web
from nats.aio.client import Client
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.app import create_app
from micboard.collector.api.live_ws import publish_committed
from micboard.collector.ingest import IngestConsumer
from micboard.collector.live import LiveHub
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.services.alerts import AlertService
from micboard.collector.services.commands import CommandService
from micboard.collector.services.devices import DeviceService
from micboard.collector.services.history import HistoryService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import prepare
from micboard.shared.natsd import EmbeddedNats
from micboard.shared.sdnotify import SystemdNotifier

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
        # Periodic jobs (stale agents, watchdog); cancelled and awaited by stop().
        self._periodic: list[asyncio.Task[None]] = []
        self.notifier = SystemdNotifier()
        # In-process fan-out of committed changes, alerts and meters to live views.
        self.hub = LiveHub()

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
        try:
            await prepare(engine, self.settings.auto_migrate)
        except BaseException:
            await engine.dispose()
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)
                self.embedded = None
            raise
        self._nc = await nats.connect(
            servers=[nats_url], name="micboard-collector", max_reconnect_attempts=-1, reconnect_time_wait=1.0,
            **collector_connect_options(self.settings, nats_url),
        )  # fmt: skip
        nc = self._nc
        ingest = IngestConsumer(
            nc, engine, self.settings, on_committed=lambda events: publish_committed(self.hub, events)
        )
        await ingest.start()
        self._ingest_task = asyncio.create_task(ingest.run(), name="ingest")
        self._periodic.append(asyncio.create_task(self._mark_stale_agents(ingest), name="stale-agents"))
        api = create_app(
            DeviceService(engine),
            settings=self.settings,
            nc=nc,
            ingest=ingest,
            hub=self.hub,
            alerts=AlertService(engine, hub=self.hub),
            history=HistoryService(engine),
            commands=CommandService(engine, nc),
        )
        runner = web.AppRunner(api, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{self.settings.http_host}:{port}"
        self.running = RunningCollector(url, nats_url, engine, ingest, runner)
        log.info("collector ready", extra={"url": url, "nats": nats_url})
        self.notifier.ready(f"listening on {url}")
        watchdog_s = self.notifier.watchdog_interval_s()
        if watchdog_s is not None:
            self._periodic.append(asyncio.create_task(self._feed_watchdog(watchdog_s), name="watchdog"))
        return self.running

    async def _mark_stale_agents(self, ingest: IngestConsumer) -> None:
        """Every ``stale_check_interval_s``: agents silent for 3 heartbeat intervals become stale."""
        while True:
            await asyncio.sleep(self.settings.stale_check_interval_s)
            try:
                async with ingest.engine.begin() as conn:
                    await ingest.sync.mark_stale_agents(conn, time.time_ns() // 1_000_000)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("stale check failed; retrying next interval", extra={"error": str(exc)})

    async def _feed_watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog while ingest runs; stop pinging (and be restarted) if it died."""
        while True:
            if self._ingest_task is not None and self._ingest_task.done():
                log.error("ingest stopped unexpectedly; no more watchdog pings")
                return
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        """Stop in reverse order: HTTP, ingest (finishing its batch), NATS, store."""
        running, self.running = self.running, None
        if running is not None:
            self.notifier.stopping()
        for task in self._periodic:
            task.cancel()
        await asyncio.gather(*self._periodic, return_exceptions=True)
        self._periodic.clear()
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
