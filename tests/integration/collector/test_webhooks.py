"""Webhook delivery to a real HTTP server on loopback: signature, retries, the delivery log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import InvalidWebhookError, WebhookNotFoundError
from micboard.collector.services.alerts import AlertService, AlertState, DeviceTransition
from micboard.collector.services.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookDispatcher,
    verify,
)
from micboard.shared.model import Device, Family, Vendor

SECRET = "s3cret-s3cret-s3cret"


@dataclass
class Receiver:
    """A real aiohttp server that records requests and answers with scripted statuses."""

    url: str
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(url="")

    async def handle(request: web.Request) -> web.Response:
        state.received.append((dict(request.headers), await request.read()))
        status = state.statuses.pop(0) if state.statuses else 204
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield state
    await runner.cleanup()


@pytest.fixture
async def dispatcher(engine: AsyncEngine) -> AsyncIterator[WebhookDispatcher]:
    hooks = WebhookDispatcher(engine, backoff_initial_s=0.02, backoff_max_s=0.05, max_attempts=3, timeout_s=2)
    await hooks.start()
    yield hooks
    await hooks.close()


async def test_signed_delivery_from_an_alert(
    engine: AsyncEngine, receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    hook = await dispatcher.add_webhook(receiver.url, SECRET, ["alert.opened"])
    alerts = AlertService(engine, webhooks=dispatcher)
    dev = Device(device_key="dev-1", vendor=Vendor.SHURE, family=Family.ULXD)
    async with engine.begin() as conn:
        changes = await alerts.evaluate_device(
            conn, DeviceTransition("venue", "pi-1", "dev-1", None, dev, None, "offline")
        )
    alerts.notify(changes)
    await alerts.acknowledge(changes[0].alert.id, "ada")  # filtered out: not "alert.opened"
    await dispatcher.drain()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert headers[SIGNATURE_HEADER].startswith("sha256=")
    assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    assert not verify("another-secret-value", body, headers[SIGNATURE_HEADER])
    assert not verify(SECRET, body + b" ", headers[SIGNATURE_HEADER])
    assert headers[EVENT_HEADER] == "alert.opened" and headers[TIMESTAMP_HEADER].isdigit()
    payload = json.loads(body)
    assert payload["event"] == "alert.opened" and payload["delivery_id"] == headers[DELIVERY_HEADER]
    assert payload["data"]["alert"]["rule"] == "device_offline"
    assert payload["data"]["alert"]["state"] == AlertState.OPEN.value
    [attempt] = await dispatcher.deliveries(hook.id)
    assert attempt.ok and attempt.status_code == 204 and attempt.attempt == 1
    assert attempt.alert_id == changes[0].alert.id
    assert SECRET not in repr(await dispatcher.list_webhooks())


async def test_failing_endpoint_retries_then_logs_failure(
    engine: AsyncEngine, receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    hook = await dispatcher.add_webhook(receiver.url, SECRET)
    receiver.statuses = [500, 503, 502]
    assert dispatcher.submit("alert.opened", {"n": 1})
    await dispatcher.drain()
    attempts = sorted(await dispatcher.deliveries(hook.id), key=lambda a: a.attempt)
    assert [(a.attempt, a.status_code, a.ok) for a in attempts] == [
        (1, 500, False),
        (2, 503, False),
        (3, 502, False),
    ]
    assert len({a.delivery_id for a in attempts}) == 1
    assert len({body for _, body in receiver.received}) == 1  # the same signed body every attempt
    assert (dispatcher.stats.failed, dispatcher.stats.delivered) == (1, 0)
    # A retryable failure followed by success; a 4xx is not retried.
    receiver.statuses = [503, 200]
    dispatcher.submit("alert.opened", {"n": 2})
    await dispatcher.drain()
    receiver.statuses = [404]
    dispatcher.submit("alert.opened", {"n": 3})
    await dispatcher.drain()
    assert (dispatcher.stats.failed, dispatcher.stats.delivered) == (2, 1)
    assert len(receiver.received) == 3 + 2 + 1


async def test_unreachable_endpoint_and_configuration(
    engine: AsyncEngine, dispatcher: WebhookDispatcher
) -> None:
    # A port nothing listens on: connection refused, retried, logged with the error.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    hook = await dispatcher.add_webhook(f"http://127.0.0.1:{port}/x", SECRET)
    dispatcher.submit("alert.resolved", {})
    await dispatcher.drain()
    attempts = await dispatcher.deliveries(hook.id)
    assert len(attempts) == 3 and all(a.status_code is None and a.error for a in attempts)
    disabled = await dispatcher.set_enabled(hook.id, False)
    assert not disabled.enabled
    dispatcher.submit("alert.resolved", {})
    await dispatcher.drain()
    assert len(await dispatcher.deliveries(hook.id)) == 3
    for url, secret in (("ftp://x/y", SECRET), ("http://127.0.0.1/x", "short")):
        with pytest.raises(InvalidWebhookError):
            await dispatcher.add_webhook(url, secret)
    await dispatcher.remove_webhook(hook.id)
    with pytest.raises(WebhookNotFoundError):
        await dispatcher.remove_webhook(hook.id)


async def test_full_queue_drops_and_counts(engine: AsyncEngine) -> None:
    hooks = WebhookDispatcher(engine, queue_size=2)  # not started: nothing drains the queue
    assert hooks.submit("a", {}) and hooks.submit("b", {})
    assert not hooks.submit("c", {})
    assert (hooks.stats.submitted, hooks.stats.dropped) == (2, 1)
    await hooks.close()
