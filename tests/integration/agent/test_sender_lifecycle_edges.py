"""EventSender lifecycle edges with a real outbox and a real nats-server: refused limits, failed starts."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from micboard.agent.outbox import Outbox, OutboxError
from micboard.agent.sender import EventSender
from micboard.shared.natsd import EmbeddedNats, free_port


def test_in_flight_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        EventSender("nats://127.0.0.1:4222", Outbox.in_state_dir(tmp_path), max_in_flight=0)


async def test_a_sender_that_never_started_closes_at_once(tmp_path: Path) -> None:
    sender = EventSender("nats://127.0.0.1:1", Outbox.in_state_dir(tmp_path))
    await sender.close()
    await sender.close()  # closed already: nothing to do
    assert not (tmp_path / "outbox.sqlite3").exists()  # the outbox was never opened
    with pytest.raises(RuntimeError, match="starts once"):
        await sender.start()


async def test_an_outbox_that_cannot_open_fails_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    sender = EventSender("nats://127.0.0.1:1", Outbox.in_state_dir(blocker / "state"))
    with pytest.raises(OutboxError, match="cannot create the state directory"):
        await sender.start()


async def test_as_a_context_manager_it_starts_and_closes(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    async with EventSender(nats_server.url, Outbox.in_state_dir(tmp_path)) as sender:
        stats = sender.outbox_stats()
        assert stats.depth == 0 and stats.corrupt_recoveries == 0
        with pytest.raises(RuntimeError, match="starts once"):
            await sender.start()
    assert (tmp_path / "outbox.sqlite3").exists()
    await sender.close()  # closed already: nothing to do


async def test_an_unreachable_server_is_reported_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A port nothing listens on: every connect is refused, the sender keeps trying.
    sender = EventSender(
        f"nats://127.0.0.1:{free_port()}", Outbox.in_state_dir(tmp_path), connect_timeout_s=0.2
    )
    with caplog.at_level(logging.WARNING, logger="micboard.agent.sender"):
        await sender.start()
        try:
            deadline = time.monotonic() + 10
            # nats-py reports a refused first connect through its error callback ("nats: ...");
            # a connect that gives up raises instead ("connect: ..."). Either is the same report.
            while not (sender.stats.last_publish_error or "").startswith(("connect: ", "nats: ")):
                assert time.monotonic() < deadline, "no connect failure reported"
                await asyncio.sleep(0.02)
            assert not sender.stats.connected and sender.nc is None
        finally:
            await sender.close(timeout_s=2)
    warned = [r for r in caplog.records if r.getMessage() == "NATS unreachable, keeping events in the outbox"]
    assert len(warned) == 1  # said once, then quietly retried
