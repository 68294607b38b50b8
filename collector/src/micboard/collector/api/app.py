"""The aiohttp application: the registered API routes, the live WebSocket, health, metrics, docs
and the dashboard, around the services of the running collector."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from nats.aio.client import Client
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from micboard.collector.api import routes_admin, routes_alerts, routes_devices, routes_fleet
from micboard.collector.api.auth import Authenticator, FailedAuthLimiter, Role, TokenStore
from micboard.collector.api.context import CONTEXT, ApiContext, context_of
from micboard.collector.api.errors import ApiError, ApiErrorCode, error_middleware
from micboard.collector.api.live_ws import LiveFeed, MeterListener
from micboard.collector.api.metrics import ApiMetrics, metrics_handler
from micboard.collector.api.models import Health
from micboard.collector.api.openapi import build_openapi, docs_html
from micboard.collector.api.routing import AUTHENTICATE, Route
from micboard.collector.dashboard import add_dashboard_routes
from micboard.collector.live import LiveHub
from micboard.collector.services.devices import DeviceService
from micboard.collector.services.fleet import FleetView
from micboard.collector.services.groups import GroupStore
from micboard.collector.settings import CollectorSettings
from micboard.shared import __version__

if TYPE_CHECKING:
    from micboard.collector.ingest import IngestConsumer
    from micboard.collector.live_bridge import LiveBridge
    from micboard.collector.services.alerts import AlertService
    from micboard.collector.services.commands import CommandService
    from micboard.collector.services.history import HistoryService
    from micboard.collector.services.meters import MeterService

log = logging.getLogger(__name__)

ROUTES: list[Route] = [
    *routes_fleet.routes.routes,
    *routes_alerts.routes.routes,
    *routes_devices.routes.routes,
    *routes_admin.routes.routes,
]
"""Every registered API route, in the order the OpenAPI document lists them."""

_DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 when the database and NATS are reachable, else 503. No token needed."""
    ctx = context_of(request.app)
    database = "ok"
    try:
        async with ctx.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError):
        database = "error"
    nats_state = "ok" if ctx.nc is not None and ctx.nc.is_connected else "error"
    healthy = database == "ok" and nats_state == "ok"
    body = Health(
        status="ok" if healthy else "unhealthy",
        version=__version__,
        database=database,
        nats=nats_state,
    )
    return web.Response(
        status=200 if healthy else 503, body=body.model_dump_json().encode(), content_type="application/json"
    )


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /api/v1/openapi.json``: the OpenAPI document (viewer token)."""
    await request.app[AUTHENTICATE](request, Role.VIEWER)
    if request.rel_url.query:
        raise ApiError(400, ApiErrorCode.INVALID_QUERY, "this endpoint takes no query parameters")
    return web.json_response(build_openapi(ROUTES))


async def docs_page(request: web.Request) -> web.Response:
    """``GET /api/v1/docs``: a page that loads the document with the tab's token and lists it."""
    return web.Response(text=docs_html(), content_type="text/html", headers=_DOCS_HEADERS)


async def live_socket(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/live``: the live WebSocket."""
    live = context_of(request.app).live
    if live is None:
        raise ApiError(
            503, ApiErrorCode.SERVICE_UNAVAILABLE, "live updates are not available in this process"
        )
    return await live.handle(request)


def create_app(
    device_service: DeviceService,
    *,
    settings: CollectorSettings | None = None,
    nc: Client | None = None,
    ingest: IngestConsumer | None = None,
    hub: LiveHub | None = None,
    alerts: AlertService | None = None,
    history: HistoryService | None = None,
    commands: CommandService | None = None,
    dashboard: bool = True,
    meter_listeners: Sequence[MeterListener] = (),
    meters: MeterService | None = None,
    bridge: LiveBridge | None = None,
) -> web.Application:
    """Build the web application around the given services.

    With a ``hub`` the live WebSocket is served (and the hub is fed from ``on_committed``); the
    feed starts and stops with the application. Its one meter subscription also feeds
    ``meter_listeners`` (the alert rules, when the process ingests), so every meter is decoded
    once per process; ``meters`` is only reported in the metrics.
    """
    settings = settings or CollectorSettings()
    engine = device_service.engine
    tokens = TokenStore(engine)
    auth = Authenticator(tokens, FailedAuthLimiter(settings.auth_failures_per_min))
    metrics = ApiMetrics()
    fleet = FleetView(engine)
    groups = GroupStore(engine)
    live = None
    if hub is not None:
        live = LiveFeed(
            fleet,
            groups,
            hub,
            auth,
            queue_messages=settings.live_queue_messages,
            meter_hz=settings.live_meter_hz,
            nc=nc,
            meter_listeners=meter_listeners,
        )
    ctx = ApiContext(
        settings=settings,
        engine=engine,
        fleet=fleet,
        tokens=tokens,
        auth=auth,
        groups=groups,
        metrics=metrics,
        nc=nc,
        ingest=ingest,
        alerts=alerts,
        history=history,
        commands=commands,
        live=live,
        bridge=bridge,
        meters=meters,
        devices=device_service,
        hub=hub,
    )
    metrics.context = ctx
    app = web.Application(middlewares=[error_middleware(metrics.observe)], client_max_size=1024**2)
    app[CONTEXT] = ctx
    app[AUTHENTICATE] = auth.authenticate
    for table in (routes_fleet.routes, routes_alerts.routes, routes_devices.routes, routes_admin.routes):
        table.mount(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/api/v1/openapi.json", openapi_json)
    app.router.add_get("/api/v1/docs", docs_page)
    app.router.add_get("/api/v1/live", live_socket)
    if dashboard:
        add_dashboard_routes(app)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    return app


async def _startup(app: web.Application) -> None:
    ctx = context_of(app)
    token = ctx.settings.bootstrap_token
    if token is not None and token.get_secret_value():
        created = await ctx.tokens.ensure(token.get_secret_value(), name="bootstrap", role=Role.ADMIN)
        log.info("bootstrap admin token " + ("created" if created else "already present"))
    if ctx.live is not None:
        await ctx.live.start()


async def _shutdown(app: web.Application) -> None:
    # on_shutdown runs before the server waits for open connections: WebSockets must close here.
    live = context_of(app).live
    if live is not None:
        await live.close()
