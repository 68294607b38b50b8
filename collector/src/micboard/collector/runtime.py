"""Process-wide tuning of the collector's interpreter, and the pause its periodic jobs take."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterable

#: Allocations between collections of the youngest generation. At CPython's default (700) a
#: collector applying thousands of events a second spends about a quarter of its time in the
#: cyclic garbage collector, walking event and state dicts that reference counting frees anyway
#: (measured with ``bench/collector.py``, see docs/PERFORMANCE.md).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Freeze the objects start-up made (never garbage) and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, _gen0), gen1, gen2)


async def cancel_all(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less once ``stop`` is set; returns whether to go on (``stop`` not set).

    Periodic jobs wait with this between two runs instead of being cancelled at shutdown: a job
    cancelled in the middle of a statement could leave its connection holding SQLite's write lock.
    """
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return not stop.is_set()
