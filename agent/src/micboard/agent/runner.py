"""The agent's main loop: announce itself, publish device state, send heartbeats until stopped.

Publishing goes through the store-and-forward :class:`~micboard.agent.sender.EventSender`: NATS
may be down at start or at any time, events wait in the outbox in the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable

from micboard.agent.natsauth import DEFAULT_NATS_URL, agent_connect_options
from micboard.agent.outbox import Outbox
from micboard.agent.publisher import EnvelopeFactory
from micboard.agent.sender import EventSender
from micboard.agent.settings import AgentSettings
from micboard.agent.startup import starting
from micboard.shared import __version__
from micboard.shared.envelope import DeviceBody, HeartbeatBody, HelloBody
from micboard.shared.model import Device

log = logging.getLogger(__name__)


def build_sender(settings: AgentSettings) -> EventSender:
    """The store-and-forward sender configured by ``settings`` (outbox in ``state_dir``).

    It connects with the agent's NATS identity: credentials, TLS and inbox prefix. The daemon and
    ``run --demo-device`` both build their sender here, so that neither can connect without them.
    Raises :class:`~micboard.shared.errors.ConfigError` when those settings are unusable.
    """
    outbox = Outbox.in_state_dir(
        settings.state_dir,
        max_bytes=settings.outbox_max_bytes,
        max_age_s=settings.outbox_max_age_s,
        fsync_interval_s=settings.outbox_fsync_interval_s,
    )
    return EventSender(
        settings.nats_url or DEFAULT_NATS_URL,
        outbox,
        name=f"micboard-agent/{settings.site}/{settings.agent}",
        publish_timeout_s=settings.publish_timeout_s,
        connect_timeout_s=settings.nats_connect_timeout_s,
        max_in_flight=settings.max_in_flight,
        max_message_bytes=settings.max_message_bytes,
        connect_options=agent_connect_options(settings),
    )


class AgentRunner:
    """Publishes ``hello``, a snapshot of each device, then heartbeats; optionally churns the devices.

    ``churn_per_s`` > 0 changes the first channel's name of the first device that many times per
    second (a steady stream of deltas for demos and fault tests).
    """

    def __init__(
        self, settings: AgentSettings, devices: Iterable[Device], *, churn_per_s: float = 0.0
    ) -> None:
        self.settings = settings
        self.devices = list(devices)
        self.churn_per_s = churn_per_s
        self.factory = EnvelopeFactory(settings.site, settings.agent)
        self.sender = build_sender(settings)
        self.started = time.monotonic()
        self._stop = asyncio.Event()

    @property
    def published(self) -> int:
        """Events acked by JetStream so far."""
        return self.sender.stats.acked

    @property
    def last_error(self) -> str | None:
        """The latest publish or connect error, if any."""
        return self.sender.stats.last_publish_error

    def stop(self) -> None:
        """Ask :meth:`run` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Publish until :meth:`stop`, then keep what is not acked in the outbox (shutdown budget).

        Raises :class:`~micboard.agent.startup.StartError` when the outbox cannot be opened.
        """
        with starting(f"outbox in {self.settings.state_dir}"):
            await self.sender.start()
        log.info(
            "agent started",
            extra={
                "site": self.settings.site,
                "agent": self.settings.agent,
                "boot": self.factory.boot,
                "nats": self.sender.url,
            },
        )
        churn: asyncio.Task[None] | None = None
        try:
            hello = HelloBody(
                version=__version__, hostname=socket.gethostname(), config={"devices": len(self.devices)}
            )
            await self.sender.send(self.factory.make(hello))
            for device in self.devices:
                body = DeviceBody(device_key=device.device_key, snapshot=device)
                await self.sender.send(self.factory.make(body))
            if self.churn_per_s > 0 and self.devices:
                churn = asyncio.create_task(self._churn(self.devices[0]), name="micboard-demo-churn")
            while not self._stop.is_set():
                await self.sender.send(self.factory.make(self._heartbeat()))
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives together with the event, and this task would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.heartbeat_interval_s):
                        await self._stop.wait()
        finally:
            if churn is not None:
                churn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await churn
            await self.sender.close(timeout_s=self.settings.shutdown_timeout_s)

    async def _churn(self, device: Device) -> None:
        period = 1.0 / self.churn_per_s
        count = 0
        while True:
            count += 1
            changes = {"channels": {1: {"name": f"HH01 take {count}"}}}
            await self.sender.send(
                self.factory.make(DeviceBody(device_key=device.device_key, changes=changes))
            )
            await asyncio.sleep(period)

    def _heartbeat(self) -> HeartbeatBody:
        stats = self.sender.stats
        return HeartbeatBody(
            interval_s=self.settings.heartbeat_interval_s,
            uptime_s=round(time.monotonic() - self.started, 3),
            version=__version__,
            devices_by_state={"online": len(self.devices)},
            outbox_depth=stats.outbox_depth,
            outbox_bytes=stats.outbox_bytes,
            dropped=stats.dropped,
            last_publish_error=stats.last_publish_error,
        )
