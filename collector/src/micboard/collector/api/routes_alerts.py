"""Alerts: list them, acknowledge and resolve them (through the AlertService)."""

from __future__ import annotations

from typing import Any

from micboard.collector.api.auth import Role
from micboard.collector.api.context import context_of
from micboard.collector.api.errors import ApiError, ApiErrorCode
from micboard.collector.api.models import (
    AlertItem,
    AlertPage,
    AlertQuery,
    NoBody,
    NoQuery,
    ThresholdsChange,
    ThresholdsItem,
    ThresholdsQuery,
)
from micboard.collector.api.routing import Call, JsonBody, RouteTable
from micboard.collector.services.alerts import AlertService, AlertThresholds
from micboard.collector.services.fleet import PageRequest

routes = RouteTable()


@routes.route(
    "GET",
    "/api/v1/alerts",
    summary="Alerts, newest first",
    role=Role.VIEWER,
    query=AlertQuery,
    body=NoBody,
    response=AlertPage,
    tag="alerts",
)
async def list_alerts(call: Call[AlertQuery, NoBody]) -> JsonBody:
    """Alerts matching the filters."""
    q = call.query
    listing = await context_of(call.app).fleet.list_alerts(
        PageRequest(q.limit, q.offset), state=q.state, site=q.site, severity=q.severity, sort=q.sort
    )
    return JsonBody.page(listing.items, listing.total, q.limit, q.offset)


def _service(call: Call[Any, Any]) -> AlertService:
    service = context_of(call.app).alerts
    if service is None:
        raise ApiError(503, ApiErrorCode.SERVICE_UNAVAILABLE, "alerts are not available in this process")
    return service


@routes.route(
    "POST",
    "/api/v1/alerts/{id}/acknowledge",
    summary="Acknowledge an open alert",
    role=Role.OPERATOR,
    query=NoQuery,
    body=NoBody,
    response=AlertItem,
    tag="alerts",
)
async def acknowledge_alert(call: Call[NoQuery, NoBody]) -> AlertItem:
    """Mark an open alert as seen by the caller; 409 if it is not open."""
    alert = await _service(call).acknowledge(call.path["id"], call.actor)
    return AlertItem.model_validate(alert.to_dict())


@routes.route(
    "POST",
    "/api/v1/alerts/{id}/resolve",
    summary="Resolve an alert by hand",
    role=Role.OPERATOR,
    query=NoQuery,
    body=NoBody,
    response=AlertItem,
    tag="alerts",
)
async def resolve_alert(call: Call[NoQuery, NoBody]) -> AlertItem:
    """Resolve an open or acknowledged alert; 409 if it is already resolved."""
    alert = await _service(call).resolve(call.path["id"], call.actor)
    return AlertItem.model_validate(alert.to_dict())


@routes.route(
    "GET",
    "/api/v1/thresholds",
    summary="A site's alert thresholds: its overrides and what is in force",
    role=Role.VIEWER,
    query=ThresholdsQuery,
    body=NoBody,
    response=ThresholdsItem,
    tag="alerts",
)
async def get_thresholds(call: Call[ThresholdsQuery, NoBody]) -> ThresholdsItem:
    """The battery, RF, clipping and agent thresholds that apply at a site (known or not yet)."""
    service = _service(call)
    overrides, in_force = await service.site_thresholds(call.query.site)
    return _thresholds_item(service, call.query.site, overrides, in_force)


def _thresholds_item(
    service: AlertService, site: str, overrides: dict[str, Any], in_force: AlertThresholds
) -> ThresholdsItem:
    return ThresholdsItem(
        site=site, overrides=overrides, in_force=in_force.model_dump(), defaults=service.defaults.model_dump()
    )


@routes.route(
    "PUT",
    "/api/v1/thresholds",
    summary="Change a site's alert thresholds",
    role=Role.ADMIN,
    query=NoQuery,
    body=ThresholdsChange,
    response=ThresholdsItem,
    tag="alerts",
)
async def change_thresholds(call: Call[NoQuery, ThresholdsChange]) -> ThresholdsItem:
    """Set some overrides, drop others; refused: 400 `alert_rules.invalid`, nothing stored."""
    body = call.body
    service = _service(call)
    overrides, in_force = await service.change_site_thresholds(
        body.site, body.values, body.reset, by=call.actor
    )
    # This process's views follow at once: its live clients get the site's tiles whose battery
    # state moved. Other collector processes' live feeds find the change at their next site
    # refresh (within 5 s).
    ctx = context_of(call.app)
    ctx.fleet.forget_bands()
    if ctx.live is not None:
        await ctx.live.refresh_site(body.site)
    return _thresholds_item(service, body.site, overrides, in_force)
