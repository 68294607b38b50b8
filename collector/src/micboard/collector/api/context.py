"""What the API's handlers reach: the services of the running collector, under one app key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from nats.aio.client import Client
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.auth import Authenticator, TokenStore
from micboard.collector.services.fleet import FleetView
from micboard.collector.services.groups import GroupStore
from micboard.collector.settings import CollectorSettings

if TYPE_CHECKING:
    from micboard.collector.api.live_ws import LiveFeed
    from micboard.collector.api.metrics import ApiMetrics
    from micboard.collector.ingest import IngestConsumer
    from micboard.collector.live import LiveHub
    from micboard.collector.live_bridge import LiveBridge
    from micboard.collector.services.alerts import AlertService
    from micboard.collector.services.commands import CommandService
    from micboard.collector.services.devices import DeviceService
    from micboard.collector.services.history import HistoryService
    from micboard.collector.services.meters import MeterService


@dataclass(slots=True)
class ApiContext:
    """The collector's parts the API uses; optional ones are absent in a bare test app."""

    settings: CollectorSettings
    engine: AsyncEngine
    fleet: FleetView
    tokens: TokenStore
    auth: Authenticator
    groups: GroupStore
    metrics: ApiMetrics
    devices: DeviceService
    nc: Client | None = None
    ingest: IngestConsumer | None = None
    alerts: AlertService | None = None
    history: HistoryService | None = None
    commands: CommandService | None = None
    live: LiveFeed | None = None
    bridge: LiveBridge | None = None
    meters: MeterService | None = None
    hub: LiveHub | None = None


CONTEXT: web.AppKey[ApiContext] = web.AppKey("api_context", ApiContext)


def context_of(app: web.Application) -> ApiContext:
    """The context of ``app``."""
    return app[CONTEXT]
