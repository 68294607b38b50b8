"""What the agent daemon's tests share: a nats-server with the collector's stream, and a leak check."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats

from micboard.collector.ingest import ensure_stream
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats


async def create_stream(url: str) -> None:
    """Create the collector's stream on the server at ``url``, as the collector does at start."""
    nc = await nats.connect(url, connect_timeout=2)
    try:
        await ensure_stream(nc.jetstream(timeout=5), CollectorSettings(nats_url=url))
    finally:
        await nc.close()


@contextlib.contextmanager
def server_with_stream(store: Path) -> Iterator[EmbeddedNats]:
    """A nats-server storing in ``store``, with the collector's stream, removed afterwards."""
    server = EmbeddedNats(store_dir=store)
    server.start()
    try:
        asyncio.run(create_stream(server.url))
        yield server
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def no_leftover_tasks_or_threads() -> AsyncIterator[None]:
    """Fail when the body leaves a task or a thread behind."""
    threads = set(threading.enumerate())
    yield
    current = asyncio.current_task()

    def leaked() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t is not current and not t.done()]

    # Cancelled tasks finish on a later loop iteration; on a loaded machine that is not within a
    # fixed 50 ms. A task still running after 5 s was left behind, not merely slow.
    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert leaked() == []
    # Zeroconf and the outbox executor threads take a moment to finish after close.
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert {t.name for t in set(threading.enumerate()) - threads} == set()
