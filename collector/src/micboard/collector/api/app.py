"""The aiohttp application: routes, and the services they call."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from micboard.collector.services.devices import DeviceFilter, DeviceService
from micboard.shared import __version__

DEVICE_SERVICE: web.AppKey[DeviceService] = web.AppKey("device_service", DeviceService)


def _problem(status: int, code: str, detail: str) -> web.Response:
    body = {"type": f"urn:micboard:error:{code}", "title": code, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


async def healthz(request: web.Request) -> web.Response:
    """Liveness and readiness: the database answers."""
    service = request.app[DEVICE_SERVICE]
    checks: dict[str, Any] = {"version": __version__}
    try:
        async with service.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except (SQLAlchemyError, OSError) as exc:
        checks["database"] = f"error: {type(exc).__name__}"
        return web.json_response({"status": "unhealthy", **checks}, status=503)
    return web.json_response({"status": "ok", **checks})


async def list_devices(request: web.Request) -> web.Response:
    """``GET /api/v1/devices``: every device with its normalized state."""
    query = request.rel_url.query
    unknown = set(query) - {"site", "status", "vendor"}
    if unknown:
        return _problem(400, "invalid_query", f"unknown query parameters: {', '.join(sorted(unknown))}")
    filters = DeviceFilter(site=query.get("site"), status=query.get("status"), vendor=query.get("vendor"))
    items = await request.app[DEVICE_SERVICE].list_devices(filters)
    return web.json_response({"items": items, "count": len(items)})


def create_app(device_service: DeviceService) -> web.Application:
    """Build the web application around the given services."""
    app = web.Application()
    app[DEVICE_SERVICE] = device_service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/devices", list_devices)
    return app
