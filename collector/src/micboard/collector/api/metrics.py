"""Prometheus metrics: API latency by route, ingest counters and lag, fleet state, live fan-out.

Each application has its own registry (several collectors may run in one test process). Values
that need a query (devices by state, open alerts, consumer lag) are read when scraped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from micboard.collector.api.context import ApiContext, context_of
from micboard.collector.api.errors import route_of
from micboard.collector.ingest import APPLY_FAILED, DEFERRED_EXPIRED

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class _Scrape:
    """Values read at scrape time."""

    devices_by_status: dict[str, int] = field(default_factory=dict)
    alerts_by_severity: dict[str, int] = field(default_factory=dict)
    pending: int | None = None


class ApiMetrics:
    """The registry of one collector's metrics and the API's own instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "micboard_api_request_seconds",
            "API request latency by route",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "micboard_api_requests",
            "API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.context: ApiContext | None = None
        self.scrape = _Scrape()
        self.registry.register(_StateCollector(self))

    def observe(self, request: web.Request, status: int, elapsed_s: float) -> None:
        """Record one finished request under its route template (not its concrete path).

        A WebSocket (101) is counted but not timed: its handler lasts as long as the connection,
        hours for a dashboard, which would say nothing of latency and swamp the histogram.
        """
        route = route_of(request)
        if status != 101:
            self.latency.labels(request.method, route).observe(elapsed_s)
        self.requests.labels(request.method, route, str(status)).inc()

    async def render(self) -> bytes:
        """Read the values that need a query, then render every metric in the text format."""
        ctx = self.context
        scrape = _Scrape()
        if ctx is not None:
            try:
                scrape.devices_by_status, scrape.alerts_by_severity = await ctx.fleet.counts()
            except (SQLAlchemyError, OSError):
                log.warning("metrics could not read the database", exc_info=True)
            if ctx.ingest is not None:
                try:
                    settings = ctx.ingest.settings
                    info = await ctx.ingest.js.consumer_info(
                        settings.stream_name, settings.durable_name, timeout=1.0
                    )
                    scrape.pending = int(info.num_pending or 0)
                except Exception:  # NATS being away only blanks the lag metric
                    log.debug("metrics could not read the consumer", exc_info=True)
        self.scrape = scrape
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Exports counters kept by the ingest loop, the live feed and auth, and the scraped values."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the current state."""
        ctx = self.metrics.context
        scrape = self.metrics.scrape
        devices = GaugeMetricFamily("micboard_devices", "Devices by status", labels=["status"])
        for status in sorted({"online", "offline", "stale", *scrape.devices_by_status}):
            devices.add_metric([status], scrape.devices_by_status.get(status, 0))
        yield devices
        alerts = GaugeMetricFamily("micboard_alerts_open", "Alerts in force by severity", labels=["severity"])
        for severity in sorted({"critical", "warning", *scrape.alerts_by_severity}):
            alerts.add_metric([severity], scrape.alerts_by_severity.get(severity, 0))
        yield alerts
        if ctx is None:
            return
        if ctx.ingest is not None:
            stats = ctx.ingest.stats
            yield CounterMetricFamily(
                "micboard_ingest_events", "Events fetched by ingest", value=stats.events
            )
            yield CounterMetricFamily("micboard_ingest_batches", "Batches applied", value=stats.batches)
            yield CounterMetricFamily(
                "micboard_ingest_batch_seconds",
                "Time spent applying batches (its rate is the share of time ingest is busy)",
                value=stats.batch_seconds,
            )
            yield CounterMetricFamily(
                "micboard_ingest_fetch_errors",
                "Fetches that failed or were refused by the server",
                value=stats.fetch_errors,
            )
            yield CounterMetricFamily(
                "micboard_ingest_failed_batches",
                "Batches rolled back for redelivery",
                value=stats.failed_batches,
            )
            outcomes = CounterMetricFamily(
                "micboard_ingest_outcomes", "Applied events by outcome", labels=["outcome"]
            )
            for outcome, count in sorted(stats.outcomes.items()):
                outcomes.add_metric([outcome], count)
            yield outcomes
            poison = CounterMetricFamily(
                "micboard_ingest_poison", "Poison events terminated by code", labels=["code"]
            )
            for code, count in sorted(stats.poison_by_code.items()):
                poison.add_metric([code], count)
            yield poison
            dead = CounterMetricFamily(
                "micboard_ingest_dead_lettered",
                "Events that failed on every delivery, kept in poison_events, by code",
                labels=["code"],
            )
            # Both codes from the start: an alert on increase() needs the series before the first.
            by_code = stats.dead_lettered_by_code
            for code in sorted({APPLY_FAILED, DEFERRED_EXPIRED, *by_code}):
                dead.add_metric([code], by_code.get(code, 0))
            yield dead
            yield CounterMetricFamily(
                "micboard_ingest_alert_failures",
                "Alert evaluations that failed (the batch was applied without them)",
                value=stats.alert_failures,
            )
            yield CounterMetricFamily(
                "micboard_ingest_database_outages",
                "Times ingest found the database unreachable and paused",
                value=stats.database_outages,
            )
            yield GaugeMetricFamily(
                "micboard_ingest_last_batch_ms", "Duration of the last batch", value=stats.last_batch_ms
            )
            if scrape.pending is not None:
                yield GaugeMetricFamily(
                    "micboard_ingest_lag_events",
                    "Events waiting in the durable consumer",
                    value=scrape.pending,
                )
        yield CounterMetricFamily("micboard_auth_failures", "Failed authentications", value=ctx.auth.failures)
        yield CounterMetricFamily(
            "micboard_auth_rate_limited",
            "Requests refused by the failed-auth limit",
            value=ctx.auth.limiter.refused,
        )
        if ctx.live is not None:
            live = ctx.live.stats
            yield GaugeMetricFamily(
                "micboard_live_clients", "Subscribed WebSocket clients", value=live.clients
            )
            yield GaugeMetricFamily(
                "micboard_live_connections",
                "Open WebSocket connections, subscribed or not (authenticating, idle)",
                value=ctx.live.open_connections,
            )
            yield CounterMetricFamily(
                "micboard_live_revoked",
                "WebSocket connections closed because their token was revoked",
                value=live.revoked,
            )
            yield CounterMetricFamily(
                "micboard_live_slow_clients_dropped",
                "Clients dropped for a full send queue",
                value=live.slow_dropped,
            )
            yield CounterMetricFamily(
                "micboard_live_messages", "Messages queued to clients", value=live.messages
            )
            yield CounterMetricFamily(
                "micboard_live_frames",
                "WebSocket frames sent (a batch carries many messages)",
                value=live.frames,
            )
            yield CounterMetricFamily(
                "micboard_live_meters", "Meter events received", value=live.meters_received
            )
            yield CounterMetricFamily(
                "micboard_live_meters_bad",
                "Meter events refused (undecodable or unknown)",
                value=live.meters_bad,
            )
        if ctx.meters is not None:
            meters = ctx.meters.stats
            counted = CounterMetricFamily(
                "micboard_meters",
                "Meters taken by this process's alert rules and history, by outcome",
                labels=["outcome"],
            )
            # One outcome per counter of MeterStats, named as its field.
            for outcome, count in dataclasses.asdict(meters).items():
                counted.add_metric([outcome], count)
            yield counted
        if ctx.bridge is not None:
            bridge = ctx.bridge.stats
            forwarded = CounterMetricFamily(
                "micboard_live_bridge_messages",
                "Live messages shared with other collector processes",
                labels=["direction"],
            )
            forwarded.add_metric(["sent"], bridge.sent)
            forwarded.add_metric(["received"], bridge.received)
            forwarded.add_metric(["failed"], bridge.failed)
            yield forwarded
            yield CounterMetricFamily(
                "micboard_live_bridge_bad",
                "Live bridge payloads refused (undecodable or malformed)",
                value=bridge.bad,
            )
            yield GaugeMetricFamily(
                "micboard_live_bridge_peers",
                "Other collector processes heard from on the live bridge",
                value=ctx.bridge.peers(),
            )


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format, no token needed."""
    body = await context_of(request.app).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
