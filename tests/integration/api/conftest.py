"""Fixtures of the API tests; the live API itself is built in tests/live_api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from tests.live_api import LiveApi, receiver, start_api

from micboard.shared.model import Device


@pytest.fixture
def make_receiver() -> Callable[..., Device]:
    """Build test receivers (see :func:`receiver`)."""
    return receiver


@pytest.fixture
def api_factory() -> Callable[..., AsyncIterator[LiveApi]]:
    """Start an API with given settings: ``async for api in api_factory(engine, nats_url, **settings)``."""
    return start_api
