"""Sites, agents, devices and channels: what the fleet looks like now."""

from __future__ import annotations

from collections.abc import Iterable

from micboard.collector.api.auth import Role
from micboard.collector.api.context import ApiContext, context_of
from micboard.collector.api.errors import ApiError
from micboard.collector.api.models import (
    AgentForget,
    AgentForgotten,
    AgentPage,
    AgentQuery,
    ChannelPage,
    ChannelQuery,
    DeviceDetail,
    DevicePage,
    DeviceQuery,
    NoBody,
    NoQuery,
    SitePage,
    SiteQuery,
)
from micboard.collector.api.routing import Call, JsonBody, RouteTable
from micboard.collector.errors import CollectorErrorCode
from micboard.collector.services.alerts import AlertChange
from micboard.collector.services.devices import ForgottenDevice
from micboard.collector.services.fleet import PageRequest

routes = RouteTable()


@routes.route(
    "GET",
    "/api/v1/sites",
    summary="Sites at a glance, worst first",
    role=Role.VIEWER,
    query=SiteQuery,
    body=NoBody,
    response=SitePage,
)
async def list_sites(call: Call[SiteQuery, NoBody]) -> JsonBody:
    """Every site with device counts by state, channels, alerts in force and its worst condition."""
    q = call.query
    listing = await context_of(call.app).fleet.list_sites(
        PageRequest(q.limit, q.offset), sort=q.sort, worst=q.worst
    )
    return JsonBody.page(listing.items, listing.total, q.limit, q.offset)


@routes.route(
    "GET",
    "/api/v1/agents",
    summary="Agents and how they are doing",
    role=Role.VIEWER,
    query=AgentQuery,
    body=NoBody,
    response=AgentPage,
)
async def list_agents(call: Call[AgentQuery, NoBody]) -> JsonBody:
    """Agents with their status, version and outbox figures."""
    q = call.query
    listing = await context_of(call.app).fleet.list_agents(
        PageRequest(q.limit, q.offset), site=q.site, status=q.status, sort=q.sort
    )
    return JsonBody.page(listing.items, listing.total, q.limit, q.offset)


def _tell_forgotten(ctx: ApiContext, gone: Iterable[ForgottenDevice], alerts: list[AlertChange]) -> None:
    """After a forget has committed: alert subscribers and webhooks, and live views drop the tiles."""
    if ctx.alerts is not None:
        ctx.alerts.notify(alerts)
    if ctx.hub is not None:
        # In every collector process, through the live bridge.
        for device in gone:
            ctx.hub.publish_device(device.site, device.agent, device.device_key, {"kind": "removed"})


@routes.route(
    "POST",
    "/api/v1/agents/forget",
    summary="Forget an agent that is gone for good, with its receivers",
    role=Role.ADMIN,
    query=NoQuery,
    body=AgentForget,
    response=AgentForgotten,
)
async def forget_agent(call: Call[NoQuery, AgentForget]) -> AgentForgotten:
    """Remove a stale agent (a retired venue) and its receivers, resolving their alerts; 409 if heard."""
    ctx = context_of(call.app)
    gone = await ctx.devices.forget_agent(call.body.agent, by=call.actor, alerts=ctx.alerts)
    _tell_forgotten(ctx, gone.devices, gone.alerts)
    return AgentForgotten(
        agent=gone.agent,
        site=gone.site,
        devices=len(gone.devices),
        alerts_resolved=len(gone.alerts),
        site_removed=gone.site_removed,
    )


@routes.route(
    "GET",
    "/api/v1/devices",
    summary="Receivers",
    role=Role.VIEWER,
    query=DeviceQuery,
    body=NoBody,
    response=DevicePage,
)
async def list_devices(call: Call[DeviceQuery, NoBody]) -> JsonBody:
    """Receivers matching the filters."""
    q = call.query
    listing = await context_of(call.app).fleet.list_devices(
        PageRequest(q.limit, q.offset),
        site=q.site,
        status=q.status,
        vendor=q.vendor,
        q=q.q,
        low_battery=q.low_battery,
        sort=q.sort,
    )
    return JsonBody.page(listing.items, listing.total, q.limit, q.offset)


@routes.route(
    "GET",
    "/api/v1/devices/{id}",
    summary="One receiver with its full state",
    role=Role.VIEWER,
    query=NoQuery,
    body=NoBody,
    response=DeviceDetail,
)
async def get_device(call: Call[NoQuery, NoBody]) -> DeviceDetail:
    """A receiver and its full normalized state."""
    device_id = call.path["id"]
    item = await context_of(call.app).fleet.get_device(device_id)
    if item is None:
        raise ApiError(404, CollectorErrorCode.DEVICE_NOT_FOUND, f"device {device_id} does not exist")
    return DeviceDetail.model_validate(item)


@routes.route(
    "DELETE",
    "/api/v1/devices/{id}",
    summary="Forget a receiver that is no longer watched",
    role=Role.ADMIN,
    query=NoQuery,
    body=NoBody,
    response=None,
    status=204,
)
async def forget_device(call: Call[NoQuery, NoBody]) -> None:
    """Remove an offline or stale receiver and resolve its alerts; 409 if its agent reports it online."""
    ctx = context_of(call.app)
    gone = await ctx.devices.forget(call.path["id"], by=call.actor, alerts=ctx.alerts)
    _tell_forgotten(ctx, [gone], gone.alerts)


@routes.route(
    "GET",
    "/api/v1/channels",
    summary="Receiver channels with transmitter and battery state",
    role=Role.VIEWER,
    query=ChannelQuery,
    body=NoBody,
    response=ChannelPage,
)
async def list_channels(call: Call[ChannelQuery, NoBody]) -> JsonBody:
    """Channels as tiles show them."""
    q = call.query
    listing = await context_of(call.app).fleet.list_channels(
        PageRequest(q.limit, q.offset),
        site=q.site,
        device_id=q.device_id,
        status=q.status,
        q=q.q,
        sort=q.sort,
    )
    return JsonBody.page(listing.items, listing.total, q.limit, q.offset)
