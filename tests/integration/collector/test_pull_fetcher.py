"""PullFetcher against a real nats-server: full batches from a backlog, prompt single events, statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from micboard.collector.ingest import IngestConsumer
from micboard.collector.pull import PullFetcher
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.shared.natsd import EmbeddedNats

STREAM = "PULLTEST"


@pytest.fixture
async def nc(nats_private: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_private.url)
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["pull.test.>"]))
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    yield client
    await client.close()


async def publish(client: Client, count: int, start: int = 0) -> None:
    js = client.jetstream()
    for i in range(start, start + count):
        await js.publish(f"pull.test.{i % 3}", str(i).encode())


async def test_a_backlog_comes_in_full_batches_and_everything_once(nc: Client) -> None:
    await publish(nc, 2500)
    fetcher = PullFetcher(nc, STREAM, "d")
    await fetcher.start()
    sizes: list[int] = []
    seen: list[int] = []
    while len(seen) < 2500:
        batch = await fetcher.fetch(1000, 2.0)
        assert batch, "a backlog never comes back empty"
        sizes.append(len(batch))
        for msg in batch:
            seen.append(int(msg.data))
            await msg.ack()
    assert sizes == [1000, 1000, 500]
    assert seen == list(range(2500))
    assert await fetcher.fetch(1000, 0.2) == []
    assert fetcher.unexpected_status == 0
    await fetcher.close()


async def test_a_quiet_stream_hands_over_an_event_as_it_arrives(nc: Client) -> None:
    fetcher = PullFetcher(nc, STREAM, "d")
    await fetcher.start()

    async def later() -> None:
        await asyncio.sleep(0.3)
        await publish(nc, 1, start=7)

    task = asyncio.create_task(later())
    started = time.monotonic()
    batch = await fetcher.fetch(1000, 5.0)
    waited = time.monotonic() - started
    await task
    assert [int(m.data) for m in batch] == [7]
    # Handed over on arrival, not at the end of the 5 s wait (a generous bound for a busy machine).
    assert waited < 4.0
    await batch[0].ack()
    await fetcher.close()
    assert fetcher.take_buffered() == []


async def test_an_unknown_consumer_is_a_counted_status_not_a_hang(nc: Client) -> None:
    told: list[str] = []
    fetcher = PullFetcher(nc, STREAM, "missing", on_status=told.append)
    await fetcher.start()
    assert await fetcher.fetch(10, 1.0) == []
    assert fetcher.unexpected_status >= 1
    assert len(told) == fetcher.unexpected_status and all(status not in ("404", "408") for status in told)
    await fetcher.close()


async def test_fetch_before_start_is_refused(nc: Client) -> None:
    with pytest.raises(RuntimeError, match="start"):
        await PullFetcher(nc, STREAM, "d").fetch(1, 0.1)


async def test_ingest_counts_a_refused_fetch(nc: Client, tmp_path: Path) -> None:
    """The durable consumer deleted under a running ingest: fetches are refused and counted."""
    settings = CollectorSettings(nats_url="nats://127.0.0.1:1", state_dir=tmp_path, fetch_timeout_s=0.5)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ingest.db'}")
    try:
        await upgrade(engine)
        ingest = IngestConsumer(nc, engine, settings)
        await ingest.start()
        await nc.jetstream().delete_consumer(settings.stream_name, settings.durable_name)
        assert await ingest.run_once() == 0
        assert ingest.stats.fetch_errors >= 1
    finally:
        await engine.dispose()


async def test_fetch_available_takes_what_is_there_and_does_not_wait_for_more(nc: Client) -> None:
    fetcher = PullFetcher(nc, STREAM, "d")
    with pytest.raises(RuntimeError, match="start"):
        await fetcher.fetch_available(1, 0.1)
    await fetcher.start()
    await publish(nc, 5)
    first = await fetcher.fetch_available(3, 5.0)
    rest = await fetcher.fetch_available(10, 5.0)
    assert [int(m.data) for m in first] == [0, 1, 2]
    assert [int(m.data) for m in rest] == [3, 4]
    # Nothing there: an empty answer at once, where fetch() would wait for the next event.
    assert await fetcher.fetch_available(10, 5.0) == []
    await publish(nc, 1, start=5)
    assert [int(m.data) for m in await fetcher.fetch_available(10, 5.0)] == [5]
    for msg in [*first, *rest]:
        await msg.ack()
    assert fetcher.unexpected_status == 0
    await fetcher.close()
