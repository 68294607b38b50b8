"""TLS on a real nats-server with the generated configuration: required TLS, verification, client certs."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import pytest
from tests.integration.security.conftest import AGENT_A, STREAM

from micboard.agent.natsauth import agent_connect_options
from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher
from micboard.agent.settings import AgentSettings
from micboard.collector.ingest import ensure_stream
from micboard.collector.security.identities import NatsConfigOptions
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import HelloBody
from micboard.shared.errors import ConfigError
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from tests.integration.security.conftest import ClientFactory, SecureFleet, TlsMaterial

pytestmark = pytest.mark.timeout(60)

ConnectErrors = (nats.errors.Error, OSError, TimeoutError)


class TlsServers:
    """Starts nats-servers with a TLS configuration generated for the test fleet; stops them afterwards."""

    def __init__(self, fleet: SecureFleet, tls: TlsMaterial, tmp_path: Path) -> None:
        self.fleet, self.tls, self.tmp_path = fleet, tls, tmp_path
        self._servers: list[EmbeddedNats] = []

    def start(self, *, require_tls: bool = True, verify_clients: bool = False) -> EmbeddedNats:
        """A server whose configuration has the TLS block; ``require_tls`` makes TLS the first byte."""
        options = NatsConfigOptions(
            listen="127.0.0.1:4222",
            tls_cert=self.tls.server_cert,
            tls_key=self.tls.server_key,
            tls_ca=self.tls.ca,
            require_tls=require_tls,
            verify_clients=verify_clients,
        )
        config = self.fleet.write_config(options)
        server = EmbeddedNats(store_dir=self.tmp_path / f"nats-{len(self._servers)}", config_file=config)
        self._servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server started here."""
        for server in self._servers:
            server.cleanup()


@pytest.fixture
def tls_servers(secure_fleet: SecureFleet, tls_material: TlsMaterial, tmp_path: Path) -> Iterator[TlsServers]:
    """A starter of TLS nats-servers for this test."""
    servers = TlsServers(secure_fleet, tls_material, tmp_path)
    yield servers
    servers.stop_all()


def _tls_url(server: EmbeddedNats, host: str = "127.0.0.1") -> str:
    return f"tls://{host}:{server.port}"


def _agent(fleet: SecureFleet, url: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "site": AGENT_A[0], "agent": AGENT_A[1], "nats_url": url,
        "nats_nkey_seed_file": fleet.seeds[AGENT_A], **overrides,
    }  # fmt: skip
    return AgentSettings(**values)


async def test_required_tls_refuses_plaintext_and_a_verifying_client_publishes(
    tls_servers: TlsServers, secure_fleet: SecureFleet, tls_material: TlsMaterial, clients: ClientFactory
) -> None:
    server = tls_servers.start(require_tls=True)
    # Plaintext, even with a valid identity, never gets to authenticate: the server says nothing
    # until a TLS handshake.
    with pytest.raises(ConnectErrors):  # no INFO, or a reset: depends on timing
        await clients.agent(AGENT_A, server.url)
    # So neither does a client that waits for the server's plaintext INFO to offer TLS.
    with pytest.raises(ConnectErrors):  # no INFO, or a reset: depends on timing
        await clients.agent(AGENT_A, server.url, tls=_context(tls_material.ca))

    collector_settings = CollectorSettings(
        nats_url=_tls_url(server), stream_name=STREAM, nats_nkey_seed_file=secure_fleet.collector_seed,
        nats_tls_ca=tls_material.ca, nats_require_tls=True,
    )  # fmt: skip
    collector = await clients.connect(
        _tls_url(server), **collector_connect_options(collector_settings, _tls_url(server))
    )
    await ensure_stream(collector.nc.jetstream(), collector_settings)

    settings = _agent(secure_fleet, _tls_url(server), nats_tls_ca=tls_material.ca, nats_require_tls=True)
    agent = await clients.connect(_tls_url(server), **agent_connect_options(settings))
    ack = await JetStreamPublisher(agent.nc, timeout_s=3.0).publish(
        EnvelopeFactory(*AGENT_A).make(HelloBody(version="1", hostname="pi", config={}))
    )
    assert ack is not None and ack.stream == STREAM
    assert agent.nc.connected_url is not None and agent.nc.connected_url.scheme == "tls"


async def test_agent_refuses_a_server_it_cannot_verify(
    tls_servers: TlsServers, secure_fleet: SecureFleet, tls_material: TlsMaterial, clients: ClientFactory
) -> None:
    server = tls_servers.start(require_tls=True)
    # A certificate from another CA: what an impostor on the venue network would present.
    wrong_ca = _agent(
        secure_fleet, _tls_url(server), nats_tls_ca=tls_material.other_ca, nats_require_tls=True
    )
    with pytest.raises(ConnectErrors, match="CERTIFICATE_VERIFY_FAILED"):
        await clients.connect(_tls_url(server), **agent_connect_options(wrong_ca))
    # The right CA but a name the certificate does not hold.
    wrong_name = _agent(
        secure_fleet, _tls_url(server), nats_tls_ca=tls_material.ca, nats_require_tls=True,
        nats_tls_hostname="nats.example.org",
    )  # fmt: skip
    with pytest.raises(ConnectErrors, match="Hostname mismatch"):
        await clients.connect(_tls_url(server), **agent_connect_options(wrong_name))
    # The name the certificate does hold.
    by_name = _agent(
        secure_fleet, _tls_url(server, "localhost"), nats_tls_ca=tls_material.ca, nats_require_tls=True
    )
    connected = await clients.connect(_tls_url(server, "localhost"), **agent_connect_options(by_name))
    assert connected.nc.is_connected


async def test_client_certificates_when_the_server_verifies_clients(
    tls_servers: TlsServers, secure_fleet: SecureFleet, tls_material: TlsMaterial, clients: ClientFactory
) -> None:
    server = tls_servers.start(require_tls=True, verify_clients=True)
    without_cert = _agent(secure_fleet, _tls_url(server), nats_tls_ca=tls_material.ca, nats_require_tls=True)
    with pytest.raises(ConnectErrors, match=r"(?i)certificate required"):
        await clients.connect(_tls_url(server), **agent_connect_options(without_cert))
    with_cert = _agent(
        secure_fleet, _tls_url(server), nats_tls_ca=tls_material.ca, nats_require_tls=True,
        nats_tls_cert=tls_material.client_cert, nats_tls_key=tls_material.client_key,
    )  # fmt: skip
    connected = await clients.connect(_tls_url(server), **agent_connect_options(with_cert))
    assert connected.nc.is_connected


async def test_tls_without_handshake_first_still_verifies_the_server(
    tls_servers: TlsServers,
    secure_fleet: SecureFleet,
    tls_material: TlsMaterial,
    clients: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = tls_servers.start(require_tls=False)
    # The server insists on TLS after its INFO; a client without TLS settings cannot verify it.
    with pytest.raises(ConnectErrors, match="CERTIFICATE_VERIFY_FAILED"):
        await clients.agent(AGENT_A, server.url)
    settings = _agent(secure_fleet, server.url, nats_tls_ca=tls_material.ca)
    with caplog.at_level(logging.WARNING, logger="micboard.shared.natsauth"):
        options = agent_connect_options(settings)
    # Works, but strippable by an active man in the middle: said so at every start.
    assert "NATS TLS without require_tls: an active man in the middle can strip it" in caplog.text
    connected = await clients.connect(server.url, **options)
    assert connected.nc.is_connected


def test_agent_refuses_a_plaintext_url_when_tls_is_required(secure_fleet: SecureFleet) -> None:
    settings = _agent(secure_fleet, "nats://127.0.0.1:4222", nats_require_tls=True)
    with pytest.raises(ConfigError, match="plaintext"):
        agent_connect_options(settings)


def _context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))
