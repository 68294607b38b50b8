"""Acting on and looking back at one device: commands (rename, identify, mute) and channel history."""

from __future__ import annotations

import time

from micboard.collector.api.auth import Role
from micboard.collector.api.context import ApiContext, context_of
from micboard.collector.api.errors import ApiError, ApiErrorCode
from micboard.collector.api.models import (
    CommandRequest,
    CommandResponse,
    HistoryPoint,
    HistoryQuery,
    HistoryResponse,
    NoBody,
    NoQuery,
)
from micboard.collector.api.routing import Call, RouteTable
from micboard.collector.errors import ChannelNotFoundError, CollectorErrorCode, InvalidHistoryQueryError
from micboard.collector.services.commands import CommandStatus
from micboard.shared.envelope import CommandAction

routes = RouteTable()

#: The history range when none is given.
DEFAULT_HISTORY_MS = 3600 * 1000
#: The highest channel index a device can have (the wire model's bound).
MAX_CHANNEL = 64

# The API names fewer outcomes than the command service knows: a timeout or an unreadable
# reply both mean "it did not work as far as we can tell".
_OUTCOMES = {
    CommandStatus.OK: "ok",
    CommandStatus.NOT_SUPPORTED: "not_supported",
    CommandStatus.DEVICE_OFFLINE: "device_offline",
    CommandStatus.INVALID: "invalid",
    CommandStatus.FAILED: "failed",
    CommandStatus.AGENT_UNREACHABLE: "agent_unreachable",
    CommandStatus.TIMEOUT: "failed",
    CommandStatus.BAD_REPLY: "failed",
}


async def _device(ctx: ApiContext, device_id: int) -> tuple[str, str, str]:
    found = await ctx.fleet.device_exists(device_id)
    if found is None:
        raise ApiError(404, CollectorErrorCode.DEVICE_NOT_FOUND, f"device {device_id} does not exist")
    return found


@routes.route(
    "GET",
    "/api/v1/devices/{id}/channels/{index}/history",
    summary="A channel's battery, RF and audio history",
    role=Role.VIEWER,
    query=HistoryQuery,
    body=NoBody,
    response=HistoryResponse,
    tag="history",
)
async def channel_history(call: Call[HistoryQuery, NoBody]) -> HistoryResponse:
    """Downsampled points of one channel in ``[from_ms, to_ms)`` (default: the last hour).

    404 ``device.not_found`` for an unknown device, then ``device.channel_not_found`` for a
    channel the device does not list and has no history of.
    """
    ctx = context_of(call.app)
    if ctx.history is None:
        raise ApiError(503, ApiErrorCode.SERVICE_UNAVAILABLE, "history is not available in this process")
    _site, agent, device_key = await _device(ctx, call.path["id"])
    index = call.path["index"]
    # Above the bound no device has the channel; the database is not asked (nor given an
    # index its integer column could refuse).
    if index > MAX_CHANNEL or not await ctx.history.knows_channel(agent, device_key, index):
        raise ChannelNotFoundError(agent, device_key, index)
    q = call.query
    to_ms = q.to_ms if q.to_ms is not None else time.time_ns() // 1_000_000
    from_ms = q.from_ms if q.from_ms is not None else max(0, to_ms - DEFAULT_HISTORY_MS)
    # Checked here, not only by the service, to name the parameters as the client gave them.
    if to_ms <= from_ms:
        default = "" if q.to_ms is not None else " (default: now)"
        raise InvalidHistoryQueryError(f"from_ms must be before to_ms{default}")
    points = await ctx.history.query(
        agent, device_key, index, start_ms=from_ms, end_ms=to_ms, resolution_s=q.resolution_s
    )
    return HistoryResponse(
        items=[
            HistoryPoint(
                ts_ms=p.bucket_ms,
                battery_percent=p.battery_percent,
                battery_bars=p.battery_bars,
                rf_dbm=p.rf_dbm,
                rf_dbm_min=p.rf_dbm_min,
                audio_dbfs=p.audio_dbfs,
                audio_peak_dbfs=p.audio_peak_dbfs,
            )
            for p in points
        ]
    )


@routes.route(
    "POST",
    "/api/v1/devices/{id}/commands",
    summary="Rename, identify, mute or unmute",
    role=Role.OPERATOR,
    query=NoQuery,
    body=CommandRequest,
    response=CommandResponse,
    tag="commands",
)
async def send_command(call: Call[NoQuery, CommandRequest]) -> CommandResponse:
    """Send a command to the device's agent and wait for its outcome (the device confirms by event)."""
    ctx = context_of(call.app)
    if ctx.commands is None:
        raise ApiError(503, ApiErrorCode.SERVICE_UNAVAILABLE, "commands are not available in this process")
    _site, agent, device_key = await _device(ctx, call.path["id"])
    body = call.body
    receipt = await ctx.commands.send(
        agent, device_key, CommandAction(body.action), body.channel, body.value, requested_by=call.actor
    )
    detail = receipt.detail
    if receipt.status in (CommandStatus.TIMEOUT, CommandStatus.BAD_REPLY):
        detail = f"{receipt.status.value}: {detail}" if detail else receipt.status.value
    return CommandResponse(outcome=_OUTCOMES[receipt.status], detail=detail)
