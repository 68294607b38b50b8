"""The agent's main loop: announce itself, publish device state, send heartbeats until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable

from nats.aio.client import Client
from nats.errors import Error as NatsError

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher, connect
from micboard.agent.settings import AgentSettings
from micboard.shared import __version__
from micboard.shared.envelope import AnyEvent, DeviceBody, HeartbeatBody, HelloBody
from micboard.shared.model import Device

log = logging.getLogger(__name__)


class AgentRunner:
    """Publishes ``hello``, a snapshot of each device, then heartbeats, retrying failed publishes."""

    def __init__(self, settings: AgentSettings, devices: Iterable[Device]) -> None:
        self.settings = settings
        self.devices = list(devices)
        self.factory = EnvelopeFactory(settings.site, settings.agent)
        self.started = time.monotonic()
        self.published = 0
        self.last_error: str | None = None
        self._stop = asyncio.Event()
        self._nc: Client | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Connect, publish, heartbeat until :meth:`stop`; close the connection on the way out."""
        url = self.settings.nats_url or "nats://127.0.0.1:4222"
        self._nc = await connect(
            url,
            name=f"micboard-agent/{self.settings.site}/{self.settings.agent}",
            connect_timeout_s=self.settings.nats_connect_timeout_s,
        )
        publisher = JetStreamPublisher(
            self._nc, timeout_s=self.settings.publish_timeout_s,
            max_bytes=self.settings.max_message_bytes,
        )  # fmt: skip
        log.info(
            "agent started",
            extra={
                "site": self.settings.site,
                "agent": self.settings.agent,
                "boot": self.factory.boot,
                "nats": url,
            },
        )
        try:
            hello = HelloBody(
                version=__version__, hostname=socket.gethostname(), config={"devices": len(self.devices)}
            )
            await self._publish(publisher, self.factory.make(hello))
            for device in self.devices:
                body = DeviceBody(device_key=device.device_key, snapshot=device)
                await self._publish(publisher, self.factory.make(body))
            while not self._stop.is_set():
                await self._publish(publisher, self.factory.make(self._heartbeat()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.heartbeat_interval_s)
        finally:
            await self._nc.drain()

    def _heartbeat(self) -> HeartbeatBody:
        return HeartbeatBody(
            interval_s=self.settings.heartbeat_interval_s,
            uptime_s=round(time.monotonic() - self.started, 3),
            version=__version__,
            devices_by_state={"online": len(self.devices)},
            last_publish_error=self.last_error,
        )

    async def _publish(self, publisher: JetStreamPublisher, event: AnyEvent) -> None:
        # The same envelope (same Msg-Id) is retried, so a retry after a lost ack is deduplicated.
        delay = 0.2
        while True:
            try:
                await publisher.publish(event)
                self.published += 1
                return
            except (NatsError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "publish failed, retrying",
                    extra={"kind": event.kind, "seq": event.seq, "error": self.last_error},
                )
                if self._stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 5.0)
