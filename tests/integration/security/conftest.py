"""A real nats-server started with the generated configuration, and the identities it knows."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client

from micboard.collector.security.identities import Fleet, FleetRegistry, NatsConfigOptions
from micboard.collector.security.natsconf import render_config, write_config
from micboard.shared.natsauth import COLLECTOR_INBOX_PREFIX, agent_inbox_prefix
from micboard.shared.natsd import EmbeddedNats

STREAM = "MICBOARD"
#: (site, agent) of the identities every secure server knows: A, another agent of A's site, another site.
AGENT_A = ("hall", "pi-1")
AGENT_B = ("hall", "pi-2")
AGENT_SITE_B = ("annex", "pi-1")


@dataclass
class SecureFleet:
    """A fleet registry on disk with a collector and three agents, and its generated server config."""

    state_dir: Path
    fleet: Fleet
    registry: FleetRegistry
    seeds: dict[tuple[str, str], Path] = field(default_factory=dict)
    config_file: Path | None = None

    @property
    def collector_seed(self) -> Path:
        """The collector's seed file."""
        return self.fleet.collector_seed_path

    def write_config(self, options: NatsConfigOptions) -> Path:
        """Generate the server configuration for the current registry."""
        path = self.state_dir / "nats-server.conf"
        write_config(path, render_config(self.registry, options, STREAM))
        self.config_file = path
        return path


@pytest.fixture
def secure_fleet(tmp_path: Path) -> SecureFleet:
    """Collector and agents A, B (same site) and site B's agent, with seeds in 0600 files."""
    fleet = Fleet(tmp_path / "state")
    registry = fleet.load()
    fleet.ensure_collector(registry)
    result = SecureFleet(tmp_path / "state", fleet, registry)
    for site, agent in (AGENT_A, AGENT_B, AGENT_SITE_B):
        result.seeds[(site, agent)] = fleet.add_agent(registry, site, agent).seed_file
    fleet.save(registry)
    return result


@pytest.fixture
def secure_nats(secure_fleet: SecureFleet, tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server running the generated configuration without TLS."""
    config = secure_fleet.write_config(NatsConfigOptions(listen="127.0.0.1:4222"))
    server = EmbeddedNats(store_dir=tmp_path / "nats-store", config_file=config)
    server.start()
    yield server
    server.cleanup()


class ErrorLog:
    """Collects the asynchronous errors the server reports to a client (permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._changed = asyncio.Event()

    async def record(self, exc: Exception) -> None:
        """The ``error_cb`` of a connection."""
        self.errors.append(str(exc))
        self._changed.set()

    async def wait_for(self, fragment: str, timeout_s: float = 3.0) -> str:
        """Wait until an error containing ``fragment`` (case-insensitive) was reported; return it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for error in self.errors:
                if fragment.lower() in error.lower():
                    return error
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no error containing {fragment!r}; got {self.errors}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue


async def _quiet_disconnect(*_args: Any) -> None:
    return None


@dataclass
class Connected:
    """A client connection and the errors the server reported to it."""

    nc: Client
    errors: ErrorLog


class ClientFactory:
    """Connects as the collector, as an agent or as nobody; closes every connection at teardown."""

    def __init__(self, fleet: SecureFleet) -> None:
        self.fleet = fleet
        self.url = ""
        self._open: list[Client] = []

    async def connect(self, url: str | None = None, **options: Any) -> Connected:
        """Connect once (no reconnect) with ``options``; raises what ``nats.connect`` raises."""
        errors = ErrorLog()
        nc = await nats.connect(
            servers=[url or self.url],
            connect_timeout=2,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=errors.record,
            disconnected_cb=_quiet_disconnect,
            **options,
        )
        self._open.append(nc)
        return Connected(nc, errors)

    async def collector(self, url: str | None = None, **options: Any) -> Connected:
        """Connect with the collector's identity."""
        return await self.connect(
            url,
            nkeys_seed=str(self.fleet.collector_seed),
            inbox_prefix=COLLECTOR_INBOX_PREFIX,
            **options,
        )

    async def agent(self, who: tuple[str, str], url: str | None = None, **options: Any) -> Connected:
        """Connect with agent ``who``'s identity and inbox prefix."""
        return await self.connect(
            url, nkeys_seed=str(self.fleet.seeds[who]), inbox_prefix=agent_inbox_prefix(*who), **options
        )

    async def close_all(self) -> None:
        """Close every connection opened here."""
        for nc in self._open:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture
async def clients(secure_fleet: SecureFleet) -> AsyncIterator[ClientFactory]:
    """Connections to a secure server, closed at the end of the test."""
    factory = ClientFactory(secure_fleet)
    yield factory
    await factory.close_all()


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    subject: str,
    *,
    is_ca: bool = False,
    server: bool = False,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if is_ca else ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    signer = key if is_ca else ca_key
    return builder.sign(signer, hashes.SHA256()), key


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """Certificates made for this test session only."""
    root = tmp_path_factory.mktemp("tls")
    ca_cert, ca_key = _issue(
        ec.generate_private_key(ec.SECP256R1()), x509.Name([]), "micboard test CA", is_ca=True
    )
    server_cert, server_key = _issue(ca_key, ca_cert.subject, "nats.test", server=True)
    client_cert, client_key = _issue(ca_key, ca_cert.subject, "hall.pi-1")
    other_cert, _ = _issue(
        ec.generate_private_key(ec.SECP256R1()), x509.Name([]), "someone else's CA", is_ca=True
    )
    files = {
        "ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server-key.pem": _key_pem(server_key),
        "client.pem": client_cert.public_bytes(serialization.Encoding.PEM),
        "client-key.pem": _key_pem(client_key),
        "other-ca.pem": other_cert.public_bytes(serialization.Encoding.PEM),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o600)
    return TlsMaterial(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server-key.pem",
        client_cert=root / "client.pem",
        client_key=root / "client-key.pem",
        other_ca=root / "other-ca.pem",
    )
