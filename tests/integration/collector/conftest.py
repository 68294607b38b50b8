"""Fixtures shared by the collector's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from micboard.shared.natsd import EmbeddedNats


@pytest.fixture
async def nc(nats_private: EmbeddedNats) -> AsyncIterator[Client]:
    """A client of this test's own nats-server, as the collector connects."""
    client = await nats.connect(servers=[nats_private.url], name="test-collector")
    yield client
    await client.close()
