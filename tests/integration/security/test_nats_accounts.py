"""Per-agent accounts on a real nats-server: replies, real commands and revocation by reload."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import nats.errors
import pytest
from nats.aio.msg import Msg
from tests.integration.security.conftest import AGENT_A, AGENT_B, AGENT_SITE_B, STREAM

from micboard.agent.daemon import AgentDaemon
from micboard.agent.natsauth import agent_connect_options
from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher, connect
from micboard.agent.settings import AgentSettings
from micboard.collector.ingest import ensure_stream
from micboard.collector.live_bridge import LIVE_SUBJECT_PREFIX
from micboard.collector.security.identities import NatsConfigOptions
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.settings import CollectorSettings
from micboard.shared.codec import decode_command_result, encode
from micboard.shared.envelope import CommandAction, CommandBody, CommandEvent, CommandOutcome, HelloBody
from micboard.shared.natsauth import COLLECTOR_INBOX_PREFIX
from micboard.shared.natsd import find_nats_server, free_port
from micboard.shared.subjects import Kind, build_subject

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from nats.js import JetStreamContext
    from tests.integration.security.conftest import ClientFactory, SecureFleet

    from micboard.shared.natsd import EmbeddedNats

pytestmark = pytest.mark.timeout(60)


def _collector_settings(tmp_path: Path, fleet: SecureFleet, url: str) -> CollectorSettings:
    return CollectorSettings(
        state_dir=tmp_path, nats_url=url, stream_name=STREAM, nats_nkey_seed_file=fleet.collector_seed,
        stream_replicas=1,
    )  # fmt: skip


async def _collector_js(
    clients: ClientFactory, url: str, fleet: SecureFleet, tmp_path: Path
) -> JetStreamContext:
    settings = _collector_settings(tmp_path, fleet, url)
    collector = await clients.connect(url, **collector_connect_options(settings, url))
    js = collector.nc.jetstream()
    await ensure_stream(js, settings)
    return js


def _command(who: tuple[str, str], action: CommandAction) -> bytes:
    body = CommandBody(request_id=secrets.token_hex(4), action=action)
    event = CommandEvent(
        site=who[0], agent=who[1], boot="collector", seq=0, ts=int(time.time() * 1000), body=body
    )
    return encode(event)


async def test_a_reply_subject_cannot_carry_the_servers_ack_to_anyone_else(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory, tmp_path: Path
) -> None:
    """JetStream acks whatever reply subject it is given; in its own account an agent reaches only itself."""
    js = await _collector_js(clients, secure_nats.url, secure_fleet, tmp_path)
    collector = await clients.collector(secure_nats.url)
    victim = await clients.agent(AGENT_SITE_B, secure_nats.url)
    neighbour = await clients.agent(AGENT_B, secure_nats.url)
    received: list[tuple[str, bytes]] = []

    async def spy(msg: Msg) -> None:
        received.append((msg.subject, msg.data))

    await victim.nc.subscribe(build_subject(*AGENT_SITE_B, Kind.CMD), cb=spy)
    await neighbour.nc.subscribe(build_subject(*AGENT_B, Kind.CMD), cb=spy)
    await collector.nc.subscribe(f"{LIVE_SUBJECT_PREFIX}.*", cb=spy)
    await collector.nc.subscribe(f"{COLLECTOR_INBOX_PREFIX}.probe", cb=spy)
    for client in (victim, neighbour, collector):
        await client.nc.flush()
        await client.nc.flush()
    forged_replies = [
        build_subject(*AGENT_SITE_B, Kind.CMD),  # another site's commands
        build_subject(*AGENT_B, Kind.CMD),  # a neighbour's commands
        build_subject(*AGENT_SITE_B, Kind.HELLO),  # another agent's place in the stream
        build_subject(*AGENT_B, Kind.DEVICE),
        f"{LIVE_SUBJECT_PREFIX}.forged",  # what collectors share with dashboards
        f"{COLLECTOR_INBOX_PREFIX}.probe",  # the collector's replies
    ]
    agent = await clients.agent(AGENT_A, secure_nats.url)
    payload = encode(EnvelopeFactory(*AGENT_A).make(HelloBody(version="1", hostname="pi", config={})))
    for reply in forged_replies:
        await agent.nc.publish(build_subject(*AGENT_A, Kind.HELLO), payload, reply=reply)
    # An awaited ack after them: the server has handled every publish before it.
    ack = await agent.nc.jetstream().publish(build_subject(*AGENT_A, Kind.HELLO), payload, timeout=3.0)
    assert ack.seq == len(forged_replies) + 1
    await asyncio.sleep(0.3)
    assert received == []
    info = await js.stream_info(STREAM, subjects_filter=">")
    assert info.state.subjects == {build_subject(*AGENT_A, Kind.HELLO): len(forged_replies) + 1}
    assert agent.errors.errors == []


async def test_the_agent_daemon_carries_out_the_collectors_command_through_the_accounts(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory, tmp_path: Path
) -> None:
    """The real daemon, with its generated identity: a command crosses into its account and back."""
    await _collector_js(clients, secure_nats.url, secure_fleet, tmp_path)
    settings = AgentSettings(
        site=AGENT_A[0], agent=AGENT_A[1], nats_url=secure_nats.url,
        nats_nkey_seed_file=secure_fleet.seeds[AGENT_A], state_dir=tmp_path / "agent",
        discovery_mdns=False, discovery_slp=False, connect_timeout_s=1.0, shutdown_timeout_s=3.0,
    )  # fmt: skip
    daemon = AgentDaemon(settings)
    await daemon.start()
    try:
        collector = await clients.collector(secure_nats.url)
        subject = build_subject(*AGENT_A, Kind.CMD)
        reply = None
        for _ in range(50):  # until the daemon's subscription is in place
            try:
                reply = await collector.nc.request(
                    subject, _command(AGENT_A, CommandAction.REDISCOVER), timeout=0.5
                )
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        assert reply is not None, "the daemon never answered"
        assert decode_command_result(reply.data).outcome is CommandOutcome.OK
        # A command whose envelope names another agent is refused, even on the right subject.
        reply = await collector.nc.request(subject, _command(AGENT_B, CommandAction.REDISCOVER), timeout=3.0)
        result = decode_command_result(reply.data)
        assert result.outcome is CommandOutcome.INVALID and "hall/pi-2" in (result.detail or "")
        assert daemon.stats.commands_refused == 1
        # Its events reached the stream through its account's imports.
        js = collector.nc.jetstream()
        info = await js.stream_info(STREAM, subjects_filter=">")
        assert build_subject(*AGENT_A, Kind.HELLO) in (info.state.subjects or {})
    finally:
        await daemon.close()


def _wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nats-server did not listen on {port}")


@pytest.fixture
def reloadable_nats(
    secure_fleet: SecureFleet, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """nats-server started the way an operator runs it (``-c`` alone), so it can reload its configuration."""
    port = free_port()
    options = NatsConfigOptions(listen=f"127.0.0.1:{port}", store_dir=tmp_path / "reload-js")
    config = secure_fleet.write_config(options)
    log = (tmp_path / "nats.log").open("wb")
    process = subprocess.Popen([str(find_nats_server()), "-c", str(config)], stdout=log, stderr=log)
    try:
        _wait_for_port(port)
        yield process, f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def test_a_revoked_agent_is_cut_off_by_a_reload_while_the_others_stay(
    reloadable_nats: tuple[subprocess.Popen[bytes], str],
    secure_fleet: SecureFleet,
    clients: ClientFactory,
    tmp_path: Path,
) -> None:
    """``agent revoke`` + ``nats-server --signal reload``: the live connection goes, a new one is refused."""
    process, url = reloadable_nats
    kept = tmp_path / "kept-copy.nk"  # the copy on the stolen Pi
    kept.write_bytes(secure_fleet.seeds[AGENT_B].read_bytes())
    kept.chmod(0o600)
    stolen = await clients.connect(url, nkeys_seed=str(kept))
    other = await clients.agent(AGENT_A, url)
    secure_fleet.fleet.revoke_agent(secure_fleet.registry, *AGENT_B)
    port = int(url.rsplit(":", 1)[1])
    secure_fleet.write_config(NatsConfigOptions(listen=f"127.0.0.1:{port}", store_dir=tmp_path / "reload-js"))
    process.send_signal(signal.SIGHUP)
    for _ in range(100):
        if not stolen.nc.is_connected:
            break
        await asyncio.sleep(0.05)
    assert not stolen.nc.is_connected
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await clients.connect(url, nkeys_seed=str(kept))
    assert other.nc.is_connected
    # The agent left in the fleet still publishes its events and gets them acknowledged.
    settings = AgentSettings(
        site=AGENT_A[0], agent=AGENT_A[1], nats_url=url, nats_nkey_seed_file=secure_fleet.seeds[AGENT_A]
    )
    nc = await connect(url, name="agent-a", **agent_connect_options(settings))
    try:
        await _collector_js(clients, url, secure_fleet, tmp_path)
        ack = await JetStreamPublisher(nc, timeout_s=3.0).publish(
            EnvelopeFactory(*AGENT_A).make(HelloBody(version="1", hostname="pi", config={}))
        )
        assert ack is not None and ack.stream == STREAM
    finally:
        await nc.close()
