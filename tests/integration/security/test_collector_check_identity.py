"""``micboard-collector check`` against the generated, credential-enforcing nats-server configuration."""

from __future__ import annotations

from tests.integration.security.conftest import SecureFleet

from micboard.collector.preflight import check_nats
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats


async def test_check_connects_with_the_collectors_identity(
    secure_fleet: SecureFleet, secure_nats: EmbeddedNats, sqlite_url: str
) -> None:
    url = secure_nats.url
    # The collector's own seed, as `run` would use it: the server lets it in, JetStream answers.
    with_seed = CollectorSettings(
        nats_url=url, database_url=sqlite_url, nats_nkey_seed_file=secure_fleet.collector_seed
    )
    result = await check_nats(with_seed)
    assert result.ok, result.detail
    # Without it the same server refuses: the check says unreachable, as the collector would fail.
    refused = await check_nats(CollectorSettings(nats_url=url, database_url=sqlite_url))
    assert not refused.ok and "unreachable" in refused.detail


async def test_check_never_prints_a_password_in_the_url(sqlite_url: str) -> None:
    settings = CollectorSettings(nats_url="nats://ops:hunter2@127.0.0.1:9", database_url=sqlite_url)
    result = await check_nats(settings)
    assert not result.ok and "hunter2" not in result.detail and "nats://127.0.0.1:9" in result.detail
