"""Least privilege on a real nats-server started with the configuration ``nats-config`` generates."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.errors import NoStreamResponseError

from micboard.agent.natsauth import agent_connect_options, command_allowed
from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher, connect
from micboard.agent.settings import AgentSettings
from micboard.collector.ingest import check_event, ensure_stream
from micboard.collector.live_bridge import LIVE_SUBJECT_PREFIX
from micboard.collector.security.identities import NatsConfigOptions
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.services.history import HistoryService
from micboard.collector.services.meters import MeterService
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine, create_schema
from micboard.shared.codec import decode, encode
from micboard.shared.envelope import (
    CommandAction,
    CommandBody,
    CommandEvent,
    CommandOutcome,
    CommandResult,
    HelloBody,
    MeterBody,
)
from micboard.shared.model import ChannelMeter
from micboard.shared.subjects import Kind, build_subject

if TYPE_CHECKING:
    from pathlib import Path

    from nats.js import JetStreamContext
    from tests.integration.security.conftest import ClientFactory, SecureFleet

    from micboard.shared.natsd import EmbeddedNats

from tests.integration.security.conftest import AGENT_A, AGENT_B, AGENT_SITE_B, STREAM

pytestmark = pytest.mark.timeout(60)


def _collector_settings(tmp_path: Path, fleet: SecureFleet, url: str) -> CollectorSettings:
    return CollectorSettings(
        state_dir=tmp_path,
        nats_url=url,
        stream_name=STREAM,
        nats_nkey_seed_file=fleet.collector_seed,
        stream_replicas=1,
    )


def _agent_settings(fleet: SecureFleet, who: tuple[str, str], url: str) -> AgentSettings:
    return AgentSettings(site=who[0], agent=who[1], nats_url=url, nats_nkey_seed_file=fleet.seeds[who])


async def _stream_count(js: JetStreamContext) -> int:
    info = await js.stream_info(STREAM)
    return info.state.messages


async def _collector_with_stream(
    clients: ClientFactory, secure_nats: EmbeddedNats, fleet: SecureFleet, tmp_path: Path
) -> JetStreamContext:
    settings = _collector_settings(tmp_path, fleet, secure_nats.url)
    collector = await clients.connect(secure_nats.url, **collector_connect_options(settings, secure_nats.url))
    js = collector.nc.jetstream()
    await ensure_stream(js, settings)
    return js


async def test_agent_publishes_its_own_events_and_the_collector_consumes_them(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory, tmp_path: Path
) -> None:
    js = await _collector_with_stream(clients, secure_nats, secure_fleet, tmp_path)
    settings = _agent_settings(secure_fleet, AGENT_A, secure_nats.url)
    nc = await connect(secure_nats.url, name="agent-a", **agent_connect_options(settings))
    try:
        publisher = JetStreamPublisher(nc, timeout_s=3.0)
        factory = EnvelopeFactory(*AGENT_A)
        ack = await publisher.publish(factory.make(HelloBody(version="1", hostname="pi", config={})))
        assert ack is not None and ack.stream == STREAM and ack.seq >= 1
    finally:
        await nc.close()
    sub = await js.pull_subscribe_bind("collector", stream=STREAM)
    msgs = await sub.fetch(1, timeout=3.0)
    event = check_event(msgs[0])
    assert (event.site, event.agent, event.kind) == (*AGENT_A, "hello")
    await msgs[0].ack()


@pytest.mark.parametrize(
    "subject",
    [
        build_subject(*AGENT_B, Kind.DEVICE),  # another agent of the same site
        build_subject(*AGENT_SITE_B, Kind.HELLO),  # the agent of the same name at another site
        build_subject(*AGENT_SITE_B, Kind.HEARTBEAT),
    ],
)
async def test_agent_cannot_publish_as_another_agent_or_site(
    secure_nats: EmbeddedNats,
    secure_fleet: SecureFleet,
    clients: ClientFactory,
    tmp_path: Path,
    subject: str,
) -> None:
    js_collector = await _collector_with_stream(clients, secure_nats, secure_fleet, tmp_path)
    before = await _stream_count(js_collector)
    agent = await clients.agent(AGENT_A, secure_nats.url)
    # The envelope claims to be the victim, so only the server's permissions can stop it.
    victim = EnvelopeFactory(*subject.split(".")[2:4])
    payload = encode(victim.make(HelloBody(version="1", hostname="evil", config={})))
    with pytest.raises((nats.errors.TimeoutError, NoStreamResponseError)):
        await agent.nc.jetstream().publish(subject, payload, timeout=1.0)
    error = await agent.errors.wait_for("permissions violation for publish")
    assert subject.lower() in error.lower()
    assert await _stream_count(js_collector) == before


@pytest.mark.parametrize(
    "subject",
    [
        build_subject(*AGENT_A, Kind.CMD),  # commanding itself (or faking the collector)
        build_subject(*AGENT_SITE_B, Kind.CMD),  # commanding another site's receivers
        f"$JS.API.STREAM.INFO.{STREAM}",  # reading the event stream through the JetStream API
        f"$JS.API.CONSUMER.CREATE.{STREAM}",
        "micboard.v1.hall.pi-1.device.extra",  # a deeper subject under its own prefix
        "micboard.live.v1.forged",  # the collectors' live bridge: no agent may feed dashboards
    ],
)
async def test_agent_cannot_publish_commands_or_use_the_jetstream_api(
    secure_nats: EmbeddedNats, clients: ClientFactory, subject: str
) -> None:
    agent = await clients.agent(AGENT_A, secure_nats.url)
    await agent.nc.publish(subject, b"{}")
    await agent.nc.flush()
    await agent.errors.wait_for("permissions violation for publish")


@pytest.mark.parametrize(
    "subject",
    [
        build_subject(*AGENT_B, Kind.CMD),  # another agent's commands
        build_subject(*AGENT_SITE_B, Kind.CMD),
        "micboard.v1.>",  # the event stream of the whole fleet
        "micboard.v1.*.*.device",
        build_subject(*AGENT_B, Kind.METER),
        "_INBOX_collector.>",  # the collector's replies (stream deliveries)
        "_INBOX_agent.hall.pi-2.>",  # another agent's acks and replies
        "micboard.live.v1.*",  # what collectors share with each other's live views
        ">",
    ],
)
async def test_agent_cannot_subscribe_to_others_commands_or_the_event_stream(
    secure_nats: EmbeddedNats, clients: ClientFactory, subject: str
) -> None:
    agent = await clients.agent(AGENT_A, secure_nats.url)
    await agent.nc.subscribe(subject)
    await agent.nc.flush()
    error = await agent.errors.wait_for("permissions violation for subscription")
    assert subject.lower() in error.lower()  # the client lower-cases server errors


async def test_agent_receives_no_command_meant_for_another_agent(
    secure_nats: EmbeddedNats, clients: ClientFactory
) -> None:
    collector = await clients.collector(secure_nats.url)
    agent = await clients.agent(AGENT_A, secure_nats.url)
    received: list[Msg] = []

    async def spy(msg: Msg) -> None:
        received.append(msg)

    await agent.nc.subscribe(build_subject(*AGENT_B, Kind.CMD), cb=spy)
    await agent.nc.flush()
    await agent.nc.flush()
    await collector.nc.publish(build_subject(*AGENT_B, Kind.CMD), b"x")
    await collector.nc.flush()
    await asyncio.sleep(0.3)
    assert received == []


async def test_collector_commands_an_agent_and_the_agent_replies(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory
) -> None:
    collector = await clients.collector(secure_nats.url)
    agent = await clients.agent(AGENT_A, secure_nats.url)
    other = await clients.agent(AGENT_B, secure_nats.url)
    subject = build_subject(*AGENT_A, Kind.CMD)

    async def handle(msg: Msg) -> None:
        event = decode(msg.data)
        allowed = command_allowed(event, *AGENT_A, subject=msg.subject)
        assert isinstance(event, CommandEvent)
        outcome = CommandOutcome.OK if allowed else CommandOutcome.INVALID
        await msg.respond(encode_result(event.body.request_id, outcome))

    await agent.nc.subscribe(subject, cb=handle)
    # Twice: right after connecting, the first flush can be answered by the connect's own PONG,
    # before the server has seen the subscription.
    await agent.nc.flush()
    await agent.nc.flush()
    command = CommandEvent(
        site=AGENT_A[0], agent=AGENT_A[1], boot="c0ffee00c0ffee00", seq=0, ts=1,
        body=CommandBody(request_id="r-1", action=CommandAction.IDENTIFY),
    )  # fmt: skip
    reply = await collector.nc.request(subject, encode(command), timeout=3.0)
    assert CommandResult.model_validate_json(reply.data).outcome is CommandOutcome.OK
    # Another agent cannot command A: only the collector's user may publish on cmd subjects.
    await other.nc.publish(subject, encode(command))
    await other.nc.flush()
    await other.errors.wait_for("permissions violation for publish")


def encode_result(request_id: str, outcome: CommandOutcome) -> bytes:
    """A command reply body (the agent daemon's own reply format may differ; this test needs any)."""
    return CommandResult(request_id=request_id, outcome=outcome).model_dump_json().encode()


async def test_client_without_credentials_or_with_an_unknown_key_is_refused(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory, tmp_path: Path
) -> None:
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await clients.connect(secure_nats.url)
    registry = secure_fleet.registry
    stranger = secure_fleet.fleet.add_agent(registry, "hall", "stranger", seed_out=tmp_path / "stranger.nk")
    # Created after the configuration was generated: the running server does not know the key.
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await clients.connect(secure_nats.url, nkeys_seed=str(stranger.seed_file))


async def test_revoked_agent_is_refused_after_the_configuration_is_regenerated(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory
) -> None:
    agent = await clients.agent(AGENT_B, secure_nats.url)
    await agent.nc.close()
    seed = secure_fleet.seeds[AGENT_B].read_bytes()
    secure_fleet.fleet.revoke_agent(secure_fleet.registry, *AGENT_B)
    secure_fleet.write_config(NatsConfigOptions(listen="127.0.0.1:4222"))
    secure_nats.stop()
    secure_nats.start()
    kept = secure_fleet.state_dir / "kept-copy.nk"  # the copy on the stolen Pi
    kept.write_bytes(seed)
    kept.chmod(0o600)
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await clients.connect(secure_nats.url, nkeys_seed=str(kept))
    still_there = await clients.agent(AGENT_A, secure_nats.url)
    assert still_there.nc.is_connected


async def test_collector_processes_share_live_changes_over_the_bridge(
    secure_nats: EmbeddedNats, clients: ClientFactory
) -> None:
    """Two collector connections (one NKey) may publish and receive on ``micboard.live.v1.*``."""
    first = await clients.collector(secure_nats.url)
    second = await clients.collector(secure_nats.url)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await received.put(msg.data)

    await second.nc.subscribe(f"{LIVE_SUBJECT_PREFIX}.*", cb=on_message)
    # Published until one arrives: nats-py's flush does not prove the SUB reached the server.
    for _ in range(30):
        await first.nc.publish(f"{LIVE_SUBJECT_PREFIX}.abc123", b"payload")
        try:
            assert await asyncio.wait_for(received.get(), 0.1) == b"payload"
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("nothing arrived on the live bridge subject")
    assert first.errors.errors == [] and second.errors.errors == []


async def test_collectors_share_an_agents_meters_in_their_queue_group(
    secure_nats: EmbeddedNats, clients: ClientFactory, tmp_path: Path
) -> None:
    """The generated permissions let the collector identity take meters in the queue group."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'meters.db'}")
    await create_schema(engine)
    recorders = [MeterService(history=HistoryService(engine)) for _ in range(2)]
    for recorder in recorders:
        collector = await clients.collector(secure_nats.url)
        await recorder.start(collector.nc)
        await collector.nc.flush()
        assert collector.errors.errors == []
    agent = await clients.agent(AGENT_A, secure_nats.url)
    body = MeterBody(device_key="rx1", channels=(ChannelMeter(index=1, audio_dbfs=-18.0),))
    factory = EnvelopeFactory(*AGENT_A)
    try:
        for _ in range(20):
            await agent.nc.publish(build_subject(*AGENT_A, Kind.METER), encode(factory.make(body)))
        await agent.nc.flush()
        for _ in range(100):
            if sum(r.stats.recorded for r in recorders) >= 20:
                break
            await asyncio.sleep(0.05)
        assert sum(r.stats.recorded for r in recorders) == 20
        assert sum(r.stats.bad for r in recorders) == 0
        assert agent.errors.errors == []
    finally:
        for recorder in recorders:
            await recorder.close()
        await engine.dispose()
