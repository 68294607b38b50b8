"""A three-node nats-server cluster on loopback (stream with three replicas) keeps ingesting, losing
nothing, when one node is killed: the path for fleets that outgrow one box."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.collector.ingest import IngestConsumer
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import upgrade
from micboard.collector.store.schema import applied_events
from micboard.shared.envelope import AnyEvent, HeartbeatBody
from micboard.shared.natsd import EmbeddedNats, free_port

pytestmark = pytest.mark.slow

EVENTS = 600


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EmbeddedNats]]:
    """Three JetStream servers routed to each other on free loopback ports."""
    names = ["n1", "n2", "n3"]
    route_ports = [free_port() for _ in names]
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    nodes = []
    for name, port in zip(names, route_ports, strict=True):
        config = tmp_path / f"{name}.conf"
        config.write_text(
            f"cluster {{\n  name: micboard\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}\n"
        )
        nodes.append(EmbeddedNats(store_dir=tmp_path / name, config_file=config, server_name=name))
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


async def _until(what: str, check: object, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            if await check():  # type: ignore[operator]
                return
        except (NatsError, TimeoutError):
            pass
        assert loop.time() < deadline, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.2)


async def _publish_all(publisher: JetStreamPublisher, events: list[AnyEvent]) -> None:
    # What the agent's outbox does: retry an unacknowledged event with the same Msg-Id
    # until the (new) stream leader acknowledges it; duplicates are dropped by the stream.
    for item in events:
        while True:
            try:
                await publisher.publish(item)
                break
            except (NatsError, TimeoutError):
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.002)


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """SQLite only: the cluster is under test here, the databases are covered elsewhere."""
    eng = create_engine(sqlite_url)
    await upgrade(eng)
    yield eng
    await eng.dispose()


async def test_ingest_survives_losing_the_stream_leader(
    cluster: list[EmbeddedNats], engine: AsyncEngine, tmp_path: Path
) -> None:
    urls = [node.url for node in cluster]
    settings = CollectorSettings(
        nats_url=urls[0], state_dir=tmp_path, stream_replicas=3, fetch_timeout_s=0.3,
        ack_wait_s=2, redelivery_backoff_s=[1], retry_delay_s=0.1, batch_size=32,
    )  # fmt: skip
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    agent_nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    ingest = IngestConsumer(nc, engine, settings)

    async def started() -> bool:
        await ingest.start()  # needs a JetStream meta leader: retried until the cluster formed
        return True

    # Usually a few seconds; a busy 2-core machine has needed more than 20 s to elect the
    # JetStream meta leader and place three replicas.
    await _until("stream with three replicas", started, timeout_s=60)
    info = await nc.jetstream().stream_info(settings.stream_name)
    assert info.config.num_replicas == 3 and info.cluster is not None
    leader = info.cluster.leader
    factory = EnvelopeFactory("venue", "pi-1")
    events = [factory.make(HeartbeatBody(uptime_s=float(i))) for i in range(EVENTS)]
    publisher = JetStreamPublisher(agent_nc, timeout_s=2.0)
    ingesting = asyncio.create_task(ingest.run())
    publishing = asyncio.create_task(_publish_all(publisher, events))

    async def applied() -> int:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(applied_events))).scalar_one())

    try:
        await _until("a third of the events applied", lambda: _at_least(applied, EVENTS // 3))
        victim = next(node for node in cluster if node.server_name == leader)
        victim.kill()
        await asyncio.wait_for(publishing, timeout=60)
        await _until("every event applied", lambda: _at_least(applied, EVENTS), timeout_s=60)
        assert not ingesting.done()
    finally:
        ingest.stop()
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await asyncio.wait_for(ingesting, timeout=10)
        await agent_nc.close()
        await nc.close()
    assert await applied() == EVENTS
    assert ingest.stats.outcomes.get("applied") == EVENTS


async def _at_least(count: object, n: int) -> bool:
    return bool(await count() >= n)  # type: ignore[operator]
