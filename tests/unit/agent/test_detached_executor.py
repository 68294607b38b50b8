"""The default executor ``micboard-agent`` gives its event loop: a hanging call cannot hold the exit."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from micboard.agent.cli import DetachedExecutor, run_async


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds the calls a test blocks; opened at the end so that no thread outlives the test for long."""
    event = threading.Event()
    yield event
    event.set()


def test_it_runs_calls_and_hands_back_results_and_exceptions() -> None:
    executor = DetachedExecutor(max_workers=2)
    try:
        assert executor.submit(sum, [1, 2, 3]).result(timeout=5) == 6
        failing = executor.submit(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            failing.result(timeout=5)
        # Sequential calls reuse the idle worker instead of starting one per call.
        for n in range(20):
            assert executor.submit(pow, n, 2).result(timeout=5) == n * n
        assert len({t for t in threading.enumerate() if t.name.startswith("micboard-executor")}) <= 2
    finally:
        executor.shutdown()


def test_shutdown_does_not_wait_for_a_hanging_call_and_cancels_what_waits(gate: threading.Event) -> None:
    executor = DetachedExecutor(max_workers=1, name="hang-test")
    hanging = executor.submit(gate.wait, 30)
    queued = executor.submit(sum, [1])
    deadline = time.monotonic() + 5
    while not hanging.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hanging.running()
    workers = [t for t in threading.enumerate() if t.name.startswith("hang-test")]
    assert workers and all(t.daemon for t in workers)

    started = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - started < 0.5
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(sum, [1])
    # The call that was running goes on, and its worker ends once it is done.
    gate.set()
    assert hanging.result(timeout=5) is True
    for worker in workers:
        worker.join(5)
        assert not worker.is_alive()


def test_a_loop_run_with_it_ends_while_a_blocking_call_still_runs(gate: threading.Event) -> None:
    # What asyncio.run does at the end (wait for the default executor's threads) held the agent's
    # exit as long as a name look-up hung; run_async returns once its coroutine has.
    started_call = threading.Event()

    def lookup() -> None:
        started_call.set()
        gate.wait(30)

    async def main() -> str:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, lookup)
        await asyncio.to_thread(started_call.wait, 5)  # to_thread uses the default executor too
        pending.cancel()
        return "done"

    started = time.monotonic()
    assert run_async(main()) == "done"
    assert time.monotonic() - started < 3
    assert started_call.is_set() and not gate.is_set()
