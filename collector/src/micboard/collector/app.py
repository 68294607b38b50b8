"""The collector process: NATS (embedded when none is configured), store, services, ingest and HTTP."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import nats
from aiohttp import web
from nats.aio.client import Client
from nats.errors import Error as NatsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.app import create_app
from micboard.collector.api.live_ws import publish_batch, publish_committed
from micboard.collector.ingest import IngestConsumer
from micboard.collector.live import LiveHub
from micboard.collector.live_bridge import LiveBridge
from micboard.collector.runtime import pause, tune_gc
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.services.alerts import AlertChange, AlertService, AlertThresholds, DeviceTransition
from micboard.collector.services.commands import CommandService
from micboard.collector.services.devices import DeviceService
from micboard.collector.services.history import HistoryService
from micboard.collector.services.meters import MeterService
from micboard.collector.services.webhooks import WebhookDispatcher
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import checkpoint_wal, create_engine, write_turn
from micboard.collector.store.migrate import prepare
from micboard.collector.store.retention import prune_records
from micboard.shared.logs import LogThrottle
from micboard.shared.natsd import EmbeddedNats
from micboard.shared.redact import register_secret
from micboard.shared.sdnotify import SystemdNotifier

log = logging.getLogger(__name__)


class NatsLog:
    """nats-py's connection callbacks as one log line each, without tracebacks.

    nats-py logs every failed attempt with a traceback by default: a collector waiting for its
    NATS server wrote some 60 lines a second. The same error is logged once per ``every_s``,
    with how many times it recurred meanwhile.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        # Set before an orderly close, which nats-py reports as a disconnection too.
        self.closing = False
        self._throttle = LogThrottle(every_s)

    @property
    def every_s(self) -> float:
        """How long one and the same error stays quiet after it was logged."""
        return self._throttle.every_s

    @every_s.setter
    def every_s(self, value: float) -> None:
        self._throttle.every_s = value

    async def error(self, exc: Exception) -> None:
        """``error_cb``: a failed attempt, a protocol error, a permissions violation."""
        text = f"{type(exc).__name__}: {exc}"[:300]
        repeated = self._throttle.due(text)
        if repeated is None:
            return
        log.warning("nats error", extra={"error": text, **({"repeated": repeated} if repeated else {})})

    async def disconnected(self) -> None:
        """``disconnected_cb``."""
        if self.closing:
            log.info("nats connection closed")
        else:
            log.warning("nats disconnected; reconnecting")

    async def reconnected(self) -> None:
        """``reconnected_cb``."""
        log.info("nats reconnected")


#: SQLite's automatic checkpoint threshold (pages of 4 KiB, so 64 MiB of WAL) while checkpoints run in
#: the background: only a backstop for when they cannot keep up.
_WAL_BACKSTOP_PAGES = 16_384
# How long stop() lets a periodic job finish the run in hand before cancelling it.
_PERIODIC_GRACE_S = 5.0
# How long queued webhook deliveries may take to go out at a stop (within TimeoutStopSec=30).
_WEBHOOK_GRACE_S = 5.0


@dataclass(slots=True)
class RunningCollector:
    """Handles of a started collector, for callers that need its address or its parts."""

    url: str
    nats_url: str
    engine: AsyncEngine
    #: None in a process started with ``ingest=False`` (API, dashboard and live views only).
    ingest: IngestConsumer | None
    runner: web.AppRunner


def _register_secrets(settings: CollectorSettings) -> None:
    """Have the log filter redact this collector's secrets by value, wherever they turn up."""
    if settings.bootstrap_token is not None:
        register_secret(settings.bootstrap_token.get_secret_value())
    if settings.database_url:
        url = make_url(settings.database_url)
        # A password that is also the user's or the database's name (micboard:micboard@) would
        # turn every mention of that name into ***: left to the URL pattern instead.
        if url.password and str(url.password) not in {url.username, url.database, url.host}:
            register_secret(str(url.password))


class Collector:
    """Owns every part of a collector process and starts and stops them in order."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.embedded: EmbeddedNats | None = None
        self.running: RunningCollector | None = None
        self._nc: Client | None = None
        self._nats_log: NatsLog | None = None
        self._engine: AsyncEngine | None = None
        self._ingest_task: asyncio.Task[None] | None = None
        # Periodic jobs (stale agents, alert sweep, watchdog); stopped and awaited by stop().
        self._periodic: list[asyncio.Task[None]] = []
        self._quit = asyncio.Event()
        self.notifier = SystemdNotifier()
        # In-process fan-out of committed changes, alerts and meters to live views.
        self.hub = LiveHub()
        self.alerts: AlertService | None = None
        self.history: HistoryService | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.meters: MeterService | None = None
        self.bridge: LiveBridge | None = None

    def alert_defaults(self) -> AlertThresholds:
        """The alert thresholds of a site without overrides, from the settings."""
        return AlertThresholds(
            resolve_hold_s=self.settings.alert_resolve_hold_s,
            clip_resolve_hold_s=self.settings.alert_clip_resolve_hold_s,
            rf_loss_s=self.settings.alert_rf_loss_s,
        )

    async def start(self) -> RunningCollector:
        """Start NATS (if embedded), the store, the services, ingest and the HTTP server.

        A failure part way stops what was started, in reverse order.
        """
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> RunningCollector:
        settings = self.settings
        _register_secrets(settings)
        self._quit = asyncio.Event()
        nats_url = settings.nats_url
        # Computed before anything is started, so that a bad option (a missing seed file, TLS
        # required of a plaintext URL) fails with nothing to clean up. The embedded server's
        # address is known only once it runs; its scheme is nats:// all the same.
        connect_options = collector_connect_options(settings, nats_url or "nats://127.0.0.1")
        if nats_url is None:
            store = settings.state_dir / "nats"
            self.embedded = EmbeddedNats(store_dir=store, binary=settings.nats_server_bin)
            await asyncio.to_thread(self.embedded.start)
            nats_url = self.embedded.url
            connect_options = collector_connect_options(settings, nats_url)
            log.info("embedded nats-server ready", extra={"nats": nats_url})
        url = settings.resolved_database_url()
        # With SQLite, the WAL is checkpointed by a task of its own (below) rather than by the
        # writer whose commit crosses SQLite's threshold: that commit would wait for an fsync.
        background_checkpoints = url.startswith("sqlite") and settings.sqlite_checkpoint_interval_s > 0
        self._engine = engine = create_engine(
            url, wal_autocheckpoint=_WAL_BACKSTOP_PAGES if background_checkpoints else None
        )
        await prepare(engine, settings.auto_migrate)
        # Until the server answers, however long (a collector started before its NATS server
        # waits for it); stop() or a signal ends the wait (see cli._run).
        self._nats_log = nats_log = NatsLog()
        self._nc = nc = await nats.connect(
            servers=[nats_url], name="micboard-collector", max_reconnect_attempts=-1, reconnect_time_wait=1.0,
            error_cb=nats_log.error, disconnected_cb=nats_log.disconnected,
            reconnected_cb=nats_log.reconnected, **connect_options,
        )  # fmt: skip
        self.history = HistoryService(
            engine,
            bucket_s=settings.history_bucket_s,
            retention_days=settings.history_retention_days,
            flush_interval_s=settings.history_flush_interval_s,
            prune_interval_s=settings.history_prune_interval_s,
        )
        if settings.live_bridge:
            # Before anything publishes on the hub: the other processes' views see it all.
            self.bridge = LiveBridge(nc, self.hub)
            await self.bridge.start()
        self.webhooks = WebhookDispatcher(engine)
        await self.webhooks.start()
        self.alerts = AlertService(
            engine, hub=self.hub, webhooks=self.webhooks, defaults=self.alert_defaults()
        )
        ingest = await self._start_ingest(nc, engine, background_checkpoints) if settings.ingest else None
        if ingest is None:
            log.info("ingest disabled: serving the API, dashboard and live views only")
        commands = CommandService(engine, nc)
        try:
            settled = await commands.settle_abandoned()
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not settle abandoned commands", extra={"error": str(exc)})
        else:
            if settled:
                log.info(
                    "commands left pending by an earlier run recorded as timed out", extra={"count": settled}
                )
        api = create_app(
            DeviceService(engine),
            settings=settings,
            nc=nc,
            ingest=ingest,
            hub=self.hub,
            alerts=self.alerts,
            history=self.history,
            commands=commands,
            meter_listeners=[] if self.meters is None else [self.meters.submit],
            meters=self.meters,
            bridge=self.bridge,
        )
        # Handlers still running at shutdown get a bounded grace, not aiohttp's default minute.
        runner = web.AppRunner(api, access_log=None, shutdown_timeout=settings.http_shutdown_timeout_s)
        await runner.setup()
        # Recorded before the socket opens so that stop() cleans the runner up should that fail.
        self.running = RunningCollector("", nats_url, engine, ingest, runner)
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{settings.http_host}:{port}"
        self.running.url = url
        if settings.tune_gc:
            tune_gc()
        log.info("collector ready", extra={"url": url, "nats": nats_url})
        self.notifier.ready(f"listening on {url}")
        watchdog_s = self.notifier.watchdog_interval_s()
        if watchdog_s is not None:
            self._periodic.append(asyncio.create_task(self._feed_watchdog(watchdog_s), name="watchdog"))
        return self.running

    async def _start_ingest(
        self, nc: Client, engine: AsyncEngine, background_checkpoints: bool
    ) -> IngestConsumer:
        """Ingest, what meters feed (alerts, history) and the jobs that keep the store: the writer's part."""
        assert self.history is not None and self.alerts is not None
        await self.history.start()
        self.meters = MeterService(alerts=self.alerts, history=self.history)
        await self.meters.start(nc)
        ingest = IngestConsumer(
            nc,
            engine,
            self.settings,
            on_committed=functools.partial(publish_batch, self.hub),
            alerts=self.alerts,
            history=self.history,
        )
        await ingest.start()
        self._ingest_task = asyncio.create_task(ingest.run(), name="ingest")
        self._periodic.append(asyncio.create_task(self._mark_stale_agents(ingest), name="stale-agents"))
        self._periodic.append(asyncio.create_task(self._sweep_alerts(self.alerts), name="alert-sweep"))
        self._periodic.append(asyncio.create_task(self._prune_dedup(ingest), name="dedup-prune"))
        if background_checkpoints:
            self._periodic.append(asyncio.create_task(self._checkpoint_wal(engine), name="wal-checkpoint"))
        return ingest

    async def _mark_stale_agents(self, ingest: IngestConsumer) -> None:
        """Every ``stale_check_interval_s``: silent agents and devices their agent no longer reports.

        Agents silent for 3 heartbeat intervals become stale, and devices a restarted agent has
        not reported within ``unreported_device_after_s`` offline. Their alerts (``agent_stale``,
        ``device_offline``) open in the same transaction, and live views are told of the devices
        whose shown status changed.
        """
        grace_ms = int(self.settings.unreported_device_after_s * 1000)
        while await pause(self._quit, self.settings.stale_check_interval_s):
            now = time.time_ns() // 1_000_000
            changes: list[AlertChange] = []
            try:
                async with write_turn(ingest.engine), ingest.engine.begin() as conn:
                    stale = await ingest.sync.mark_stale(conn, now)
                    unreported = await ingest.sync.mark_unreported(conn, now, grace_ms)
                    if self.alerts is not None and stale.agents:
                        changes += await self.alerts.agents_changed(conn, stale=stale.agents, now_ms=now)
                    if self.alerts is not None and unreported:
                        offline = [
                            DeviceTransition(d.site, d.agent, d.device_key, None, None, "online", "offline")
                            for d in unreported
                        ]
                        changes += await self.alerts.evaluate_devices(conn, offline, now_ms=now)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("stale check failed; retrying next interval", extra={"error": str(exc)})
                continue
            if self.alerts is not None:
                self.alerts.notify(changes)
            publish_committed(self.hub, (), [*stale.devices, *unreported])

    async def _prune_dedup(self, ingest: IngestConsumer) -> None:
        """Every ``dedup_prune_interval_s``: drop dedup records past ``dedup_retention_s``."""
        while True:
            now = time.time_ns() // 1_000_000
            try:
                async with write_turn(ingest.engine), ingest.engine.begin() as conn:
                    pruned = await ingest.sync.prune_applied(
                        conn, now - int(self.settings.dedup_retention_s * 1000)
                    )
                if pruned:
                    log.info("pruned dedup records", extra={"count": pruned})
                cutoff = now - int(self.settings.records_retention_days * 86_400_000)
                async with write_turn(ingest.engine), ingest.engine.begin() as conn:
                    records = await prune_records(conn, cutoff)
                if records.total:
                    log.info(
                        "pruned old records",
                        extra={
                            "alerts": records.alerts,
                            "webhook_deliveries": records.webhook_deliveries,
                            "commands": records.commands,
                        },
                    )
            except (SQLAlchemyError, OSError) as exc:
                log.warning("prune failed; retrying next interval", extra={"error": str(exc)})
            if not await pause(self._quit, self.settings.dedup_prune_interval_s):
                return

    async def _checkpoint_wal(self, engine: AsyncEngine) -> None:
        """Every ``sqlite_checkpoint_interval_s``: a PASSIVE checkpoint of the SQLite WAL."""
        while await pause(self._quit, self.settings.sqlite_checkpoint_interval_s):
            try:
                busy, frames, done = await checkpoint_wal(engine)
            except (SQLAlchemyError, OSError) as exc:
                log.warning("WAL checkpoint failed; retrying next interval", extra={"error": str(exc)})
                continue
            if frames - done > _WAL_BACKSTOP_PAGES // 2:
                # Readers keep it from copying what the WAL holds (a WAL copied whole is reused
                # from its start by the next writer, however long it grew); SQLite's own
                # checkpoint takes over at the backstop.
                log.warning(
                    "WAL checkpoint falling behind",
                    extra={"busy": busy, "frames": frames, "checkpointed": done},
                )

    async def _sweep_alerts(self, alerts: AlertService) -> None:
        """Every ``alert_sweep_interval_s``: held resolutions, agent rules, aged-out batteries."""
        while await pause(self._quit, self.settings.alert_sweep_interval_s):
            try:
                await alerts.sweep()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("alert sweep failed; retrying next interval", extra={"error": str(exc)})

    async def _feed_watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog while ingest runs; stop pinging (and be restarted) if it died."""
        while True:
            if self._ingest_task is not None and self._ingest_task.done():
                log.error("ingest stopped unexpectedly; no more watchdog pings")
                return
            self.notifier.watchdog()
            if not await pause(self._quit, interval_s):
                return

    async def stop(self) -> None:
        """Stop in reverse order: HTTP, periodic jobs, ingest (finishing its batch), meters,
        webhooks, live bridge, history (flushing), NATS, store, embedded NATS. Safe after a partial
        start."""
        running, self.running = self.running, None
        if running is not None:
            self.notifier.stopping()
            # HTTP first: the live feed (and its meter subscription) stops with the application.
            await running.runner.cleanup()
            if running.ingest is not None:
                running.ingest.stop()
        # Asked, not cancelled: a job cancelled in the middle of a statement could leave its
        # connection holding SQLite's write lock, and the history flush below then failed.
        self._quit.set()
        if self._periodic:
            _done, overrun = await asyncio.wait(self._periodic, timeout=_PERIODIC_GRACE_S)
            for task in overrun:
                task.cancel()
            await asyncio.gather(*self._periodic, return_exceptions=True)
        self._periodic.clear()
        if self._ingest_task is not None:
            try:
                await asyncio.wait_for(self._ingest_task, timeout=self.settings.fetch_timeout_s + 5)
            except TimeoutError:
                self._ingest_task.cancel()
                await asyncio.gather(self._ingest_task, return_exceptions=True)
            self._ingest_task = None
        if self.meters is not None:
            await self.meters.close()
            self.meters = None
        if self.webhooks is not None:
            # Ingest has stopped: the alerts of its last batches get a few seconds to go out.
            await self.webhooks.close(grace_s=_WEBHOOK_GRACE_S)
            self.webhooks = None
        if self.bridge is not None:
            await self.bridge.close()
            self.bridge = None
        if self.history is not None:
            try:
                await self.history.close()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("history flush at stop failed", extra={"error": str(exc)})
            self.history = None
        self.alerts = None
        if self._nc is not None:
            if self._nats_log is not None:
                self._nats_log.closing = True
            try:
                await self._nc.close()
            except (OSError, NatsError) as exc:
                # The server went first (Ctrl-C reaches a whole terminal's processes at once):
                # there is nothing left to flush to it, and the rest must still shut down.
                log.warning("NATS connection lost while closing", extra={"error": str(exc)})
            self._nc = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
