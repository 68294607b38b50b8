"""WebhookDispatcher configuration edges on the real store: bad limits, bad events, unknown ids."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import InvalidWebhookError, WebhookNotFoundError
from micboard.collector.services.webhooks import WebhookDispatcher

SECRET = "s3cret-s3cret-s3cret"


async def test_limits_must_be_positive(engine: AsyncEngine) -> None:
    for limits in ({"queue_size": 0}, {"max_attempts": 0}, {"max_concurrent": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            WebhookDispatcher(engine, **limits)


async def test_event_names_must_be_non_empty_strings(engine: AsyncEngine) -> None:
    hooks = WebhookDispatcher(engine)
    with pytest.raises(InvalidWebhookError, match="event names"):
        await hooks.add_webhook("https://hooks.example/x", SECRET, ["alert.opened", ""])
    assert await hooks.list_webhooks() == []
    hook = await hooks.add_webhook("https://hooks.example/x", SECRET, ["alert.opened"], enabled=False)
    assert hook.accepts("alert.opened") and not hook.accepts("alert.resolved")
    assert (await hooks.set_enabled(hook.id, True)).enabled is True
    with pytest.raises(WebhookNotFoundError):
        await hooks.set_enabled(hook.id + 100, True)
    assert [h.enabled for h in await hooks.list_webhooks()] == [True]


async def test_start_is_idempotent_and_close_is_repeatable(engine: AsyncEngine) -> None:
    hooks = WebhookDispatcher(engine)
    await hooks.start()
    worker = hooks._worker
    await hooks.start()
    assert hooks._worker is worker and worker is not None
    await hooks.close()
    assert hooks._worker is None and hooks._session is None
    await hooks.close()
