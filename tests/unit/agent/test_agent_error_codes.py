"""StartError and OutboxError belong to the MicboardError hierarchy, with stable codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from micboard.agent.outbox import Outbox, OutboxError
from micboard.agent.startup import StartError, starting
from micboard.shared.errors import ErrorCode, MicboardError


def test_the_codes_are_stable() -> None:
    assert ErrorCode.AGENT_START_FAILED.value == "agent.start_failed"
    assert ErrorCode.OUTBOX_FAILED.value == "outbox.failed"


def test_start_error_has_a_code_and_keeps_its_one_line_text() -> None:
    exc = StartError("metrics endpoint 127.0.0.1:9100", "address already in use")
    assert isinstance(exc, MicboardError) and exc.code is ErrorCode.AGENT_START_FAILED
    assert (exc.what, exc.reason) == ("metrics endpoint 127.0.0.1:9100", "address already in use")
    # What `micboard-agent run` prints after "cannot start:", unchanged.
    assert str(exc) == exc.message == "metrics endpoint 127.0.0.1:9100: address already in use"


def test_outbox_error_has_a_code(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(OutboxError) as info:
        Outbox(blocker / "state" / "outbox.sqlite3").open()
    assert isinstance(info.value, MicboardError) and info.value.code is ErrorCode.OUTBOX_FAILED
    assert info.value.message.startswith("cannot create the state directory")
    assert str(info.value) == f"[outbox.failed] {info.value.message}"


def test_an_outbox_failure_at_start_reads_as_before(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StartError) as info, starting(f"outbox in {blocker / 'state'}"):
        Outbox(blocker / "state" / "outbox.sqlite3").open()
    assert isinstance(info.value.__cause__, OutboxError)
    # The reason is the outbox's message, without its code in the middle of the line.
    assert info.value.reason == info.value.__cause__.message
    assert str(info.value).startswith(f"outbox in {blocker / 'state'}: cannot create the state directory")


def test_a_bug_is_not_turned_into_a_start_error() -> None:
    with pytest.raises(ZeroDivisionError), starting("anything"):
        _ = 1 / 0
