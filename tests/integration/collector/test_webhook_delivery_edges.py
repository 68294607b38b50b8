"""WebhookDispatcher failure edges on the real store and real sockets: a broken store, a closed session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.waiting import until

from micboard.collector.services.webhooks import WebhookDispatcher, _Job
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.redact import redact_text

SECRET = "s3cret-s3cret-s3cret"
LOGGER = "micboard.collector.services.webhooks"


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """A real HTTP endpoint answering with scripted statuses (204 once the script is used up)."""
    received: list[bytes] = []
    statuses: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=statuses.pop(0) if statuses else 204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received, statuses
    await runner.cleanup()


async def test_a_broken_job_is_logged_and_the_worker_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No schema at all: reading the webhooks fails, as when the store is away.
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    hooks = WebhookDispatcher(broken)
    await hooks.start()
    try:
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert hooks.submit("alert.opened", {"n": 1})
            await hooks.drain()
            assert hooks.submit("alert.opened", {"n": 2})
            await hooks.drain()
        failed = [r for r in caplog.records if r.getMessage() == "webhook job failed"]
        assert len(failed) == 2 and {r.__dict__["event"] for r in failed} == {"alert.opened"}
        assert hooks._worker is not None and not hooks._worker.done()
        assert (hooks.stats.submitted, hooks.stats.attempts, hooks.stats.delivered) == (2, 0, 0)
    finally:
        await hooks.close()
        await broken.dispose()


async def test_a_delivery_whose_log_cannot_be_written_still_counts_and_frees_its_slot(
    sqlite_url: str,
    endpoint: tuple[str, list[bytes], list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, received, _ = endpoint
    engine = create_engine(sqlite_url)
    await upgrade(engine)
    hooks = WebhookDispatcher(engine, max_concurrent=1, max_attempts=1, timeout_s=5)
    try:
        await hooks.add_webhook(url, SECRET)
        # The delivery log is gone: the POST succeeds but logging the attempt fails.
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE webhook_deliveries"))
        await hooks.start()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            hooks.submit("alert.opened", {"n": 1})
            await hooks.drain()
            # The one slot was released: a second job is delivered too.
            hooks.submit("alert.opened", {"n": 2})
            await hooks.drain()
        assert len(received) == 2
        unlogged = [r for r in caplog.records if r.getMessage() == "webhook delivery not logged"]
        assert len(unlogged) == 2 and "webhook_deliveries" in unlogged[0].__dict__["error"]
        assert hooks.stats.attempts == 2 and hooks.stats.delivered == 2
        assert not hooks._slots.locked()
    finally:
        await hooks.close()
        await engine.dispose()


async def test_a_crashed_delivery_is_logged_and_frees_its_slot(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = WebhookDispatcher(engine, max_concurrent=1, max_attempts=1, timeout_s=5)

    async def broken_post(*_args: object) -> int:
        raise RuntimeError("a bug in the delivery path")

    # Fault injection: an error no delivery path expects, to prove the worker survives it.
    monkeypatch.setattr(hooks, "_post", broken_post)
    await hooks.add_webhook("http://127.0.0.1:9/never", SECRET)
    await hooks.start()
    try:
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            for n in (1, 2):  # the one slot is released after each crash
                hooks.submit("alert.opened", {"n": n})
                await hooks.drain()
        crashed = [r for r in caplog.records if r.getMessage() == "webhook delivery crashed"]
        assert len(crashed) == 2 and "a bug in the delivery path" in crashed[0].__dict__["error"]
        assert not hooks._slots.locked()
    finally:
        await hooks.close()


async def test_temporary_statuses_are_retried_and_the_log_lists_every_webhook(
    engine: AsyncEngine, endpoint: tuple[str, list[bytes], list[int]]
) -> None:
    url, received, statuses = endpoint
    hooks = WebhookDispatcher(engine, max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, timeout_s=5)
    await hooks.start()
    try:
        first = await hooks.add_webhook(url, SECRET, ["alert.opened"])
        second = await hooks.add_webhook(url + "?second", SECRET, ["alert.opened"])
        statuses.extend([408, 429])
        hooks.submit("alert.opened", {"n": 1}, alert_id=5)
        await hooks.drain()
        attempts = await hooks.deliveries()  # every webhook, newest first
        assert {a.webhook_id for a in attempts} == {first.id, second.id}
        assert sorted(a.status_code or 0 for a in attempts) == [204, 204, 408, 429]
        assert all(a.alert_id == 5 and a.event == "alert.opened" for a in attempts)
        assert attempts[0].created_ms >= attempts[-1].created_ms
        assert len(await hooks.deliveries(limit=2)) == 2
        assert hooks.stats.delivered == 2 and hooks.stats.failed == 0
        assert hooks.stats.by_status == {"204": 2, "408": 1, "429": 1}
        assert len(received) == 4
        # A secret the dispatcher used is known to the log filter by value from then on.
        assert redact_text(f"signed with {SECRET}") == "signed with ***"
        # Removing one webhook removes its log and leaves the other's.
        await hooks.remove_webhook(first.id)
        assert {a.webhook_id for a in await hooks.deliveries()} == {second.id}
    finally:
        await hooks.close()


async def test_a_delivery_without_a_session_fails_as_a_connection_error(engine: AsyncEngine) -> None:
    hooks = WebhookDispatcher(engine, max_attempts=2, backoff_initial_s=0.01)
    hook = await hooks.add_webhook("http://127.0.0.1:9/x", SECRET)
    # Never started (or already closed): there is no HTTP session to post with.
    await hooks._deliver(hook.id, hook.url, SECRET, _Job("alert.opened", {}, None, 0))
    attempts = await hooks.deliveries(hook.id)
    assert [a.attempt for a in sorted(attempts, key=lambda a: a.attempt)] == [1, 2]
    assert all(a.error == "ClientConnectionError: dispatcher is closed" for a in attempts)
    assert hooks.stats.failed == 1 and hooks.stats.by_status == {"error": 2}
    await hooks.close()


async def test_a_slow_endpoint_times_out_and_is_retried(engine: AsyncEngine) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hooks = WebhookDispatcher(engine, max_attempts=2, backoff_initial_s=0.01, timeout_s=0.3)
    await hooks.start()
    try:
        hook = await hooks.add_webhook(f"http://127.0.0.1:{runner.addresses[0][1]}/slow", SECRET)
        hooks.submit("alert.opened", {})
        await hooks.drain(timeout_s=30)
        attempts = await hooks.deliveries(hook.id)
        assert len(attempts) == 2 and all(a.status_code is None and not a.ok for a in attempts)
        assert all(a.error is not None and "Timeout" in a.error for a in attempts)
        assert hooks.stats.failed == 1
    finally:
        release.set()
        await hooks.close()
        await runner.cleanup()


async def test_retries_stop_when_the_webhook_is_disabled_or_removed(
    engine: AsyncEngine, endpoint: tuple[str, list[bytes], list[int]]
) -> None:
    url, received, statuses = endpoint
    statuses.extend([503] * 20)
    hooks = WebhookDispatcher(engine, max_attempts=8, backoff_initial_s=0.3, backoff_max_s=0.3, timeout_s=5)
    await hooks.start()
    try:
        disabled = await hooks.add_webhook(url, SECRET)
        removed = await hooks.add_webhook(url + "?removed", SECRET)
        hooks.submit("alert.opened", {"n": 1})
        await until(lambda: len(received) >= 2)  # each webhook's first attempt, answered 503
        # An operator turns one off and deletes the other while their retries wait.
        await hooks.set_enabled(disabled.id, False)
        await hooks.remove_webhook(removed.id)
        await hooks.drain()
        assert len(received) == 2, "a retry went to a webhook that was turned off or removed"
        assert [a.attempt for a in await hooks.deliveries(disabled.id)] == [1]
        assert await hooks.deliveries(removed.id) == []
    finally:
        await hooks.close()


async def test_a_stop_lets_queued_deliveries_go_out_and_counts_what_it_abandons(
    engine: AsyncEngine, endpoint: tuple[str, list[bytes], list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    url, received, statuses = endpoint
    hooks = WebhookDispatcher(engine, backoff_initial_s=30, timeout_s=5)
    await hooks.start()
    await hooks.add_webhook(url, SECRET)
    # Submitted just before the stop (the last batch's alerts): delivered within the grace.
    hooks.submit("alert.opened", {"n": 1})
    await hooks.close(grace_s=5)
    assert len(received) == 1 and hooks.stats.delivered == 1 and hooks.stats.abandoned == 0
    # An endpoint in trouble: its retry waits 30 s, past the grace, so it is given up and said so.
    hooks = WebhookDispatcher(engine, backoff_initial_s=30, timeout_s=5)
    await hooks.start()
    statuses.append(503)
    hooks.submit("alert.opened", {"n": 2})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await hooks.close(grace_s=0.5)
    assert len(received) == 2 and hooks.stats.abandoned == 1
    assert "webhook deliveries abandoned at shutdown" in caplog.text
