"""Fixtures shared by the collector's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats


@pytest.fixture
async def nc(nats_private: EmbeddedNats) -> AsyncIterator[Client]:
    """A client of this test's own nats-server, as the collector connects."""
    client = await nats.connect(servers=[nats_private.url], name="test-collector")
    yield client
    await client.close()


@pytest.fixture
def collector_settings(tmp_path: Path) -> Callable[..., CollectorSettings]:
    """Settings of a whole collector on ``<tmp>/collector.db``, for a NATS URL, with overrides."""

    def make(nats_url: str, **overrides: Any) -> CollectorSettings:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'collector.db'}",
            "auto_migrate": "always",
            "http_port": 0,
            "state_dir": tmp_path / "state",
            "fetch_timeout_s": 0.1,
        }
        return CollectorSettings(**{**values, **overrides})

    return make
