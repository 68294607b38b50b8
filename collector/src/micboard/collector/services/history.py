"""HistoryService: per-channel battery, RF and audio samples, downsampled for charts.

Downsampling: samples are folded in memory into one aggregate per channel per bucket
(``bucket_s``, default 60 s) and flushed periodically with a merging upsert, so the table holds
at most one row per channel per bucket whatever the meter rate, and several collectors writing
the same bucket merge rather than overwrite. Each row keeps the *worst* battery (minimum percent
and bars), the RF envelope (``rf_dbm`` the maximum and ``rf_dbm_min`` the minimum of the best
antenna), the loudest audio (maximum ``audio_dbfs`` and ``audio_peak_dbfs``) and how many
samples were folded. Queries re-bucket with the same aggregates, and fold in this process's
aggregates not written yet: a chart shows the current minute at once, not after the next flush.
Battery is sampled when device state arrives (it changes rarely); charts draw it as a step.

Bounds: at most ``max_pending`` aggregates wait in memory (one per channel per bucket); beyond
that new samples are dropped and counted (``stats.dropped``). Retention: rows older than
``retention_days`` (default 30) are deleted by :meth:`HistoryService.prune`, run by the periodic
task next to the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, bindparam, case, delete, func, literal_column, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from micboard.collector.errors import InvalidHistoryQueryError
from micboard.collector.runtime import pause
from micboard.collector.store.database import write_turn
from micboard.collector.store.prepared import Prepared, prepare
from micboard.collector.store.schema import channels, devices
from micboard.collector.store.schema_alerts import history_samples
from micboard.shared.envelope import MeterBody
from micboard.shared.model import Device

log = logging.getLogger(__name__)

MAX_POINTS = 10_000
"""The most points one query may return."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _min(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return a if b is None or a <= b else b


def _max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return a if b is None or a >= b else b


@dataclass(slots=True)
class _Aggregate:
    site: str
    battery_percent: int | None = None
    battery_bars: int | None = None
    rf_dbm: float | None = None
    rf_dbm_min: float | None = None
    audio_dbfs: float | None = None
    audio_peak_dbfs: float | None = None
    samples: int = 0


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One point of a channel's history: aggregates over ``[bucket_ms, bucket_ms + resolution)``."""

    bucket_ms: int
    battery_percent: int | None
    battery_bars: int | None
    rf_dbm: float | None
    rf_dbm_min: float | None
    audio_dbfs: float | None
    audio_peak_dbfs: float | None
    samples: int


@dataclass(slots=True)
class HistoryStats:
    """Counters of the history service, exported as metrics."""

    recorded: int = 0
    dropped: int = 0
    flushed_rows: int = 0
    pruned_rows: int = 0
    failed_flushes: int = 0


def _least(current: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    # LEAST/GREATEST differ between SQLite and PostgreSQL in how they treat NULL; CASE does not.
    return case((current.is_(None), new), (new.is_(None), current), (new < current, new), else_=current)


def _greatest(current: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((current.is_(None), new), (new.is_(None), current), (new > current, new), else_=current)


_Key = tuple[str, str, int, int]  # agent, device_key, channel, bucket_ms

#: Aggregates written per transaction by :meth:`HistoryService.flush`, and the pause between two.
FLUSH_CHUNK = 500
FLUSH_PAUSE_S = 0.01
#: How long :meth:`HistoryService.close` lets a flush in progress finish before cancelling it.
CLOSE_GRACE_S = 10.0


def _fold(into: _Aggregate, other: _Aggregate | HistoryPoint) -> None:
    """Fold ``other`` into ``into`` as the merging upsert does: worst battery, RF envelope, loudest audio."""
    into.battery_percent = _min(into.battery_percent, other.battery_percent)
    into.battery_bars = _min(into.battery_bars, other.battery_bars)
    into.rf_dbm = _max(into.rf_dbm, other.rf_dbm)
    into.rf_dbm_min = _min(into.rf_dbm_min, other.rf_dbm_min)
    into.audio_dbfs = _max(into.audio_dbfs, other.audio_dbfs)
    into.audio_peak_dbfs = _max(into.audio_peak_dbfs, other.audio_peak_dbfs)
    into.samples += other.samples


def _row(key: _Key, agg: _Aggregate) -> dict[str, Any]:
    agent, device_key, channel, bucket_ms = key
    return {
        "agent": agent,
        "device_key": device_key,
        "channel": channel,
        "bucket_ms": bucket_ms,
        "site": agg.site,
        "battery_percent": agg.battery_percent,
        "battery_bars": agg.battery_bars,
        "rf_dbm": agg.rf_dbm,
        "rf_dbm_min": agg.rf_dbm_min,
        "audio_dbfs": agg.audio_dbfs,
        "audio_peak_dbfs": agg.audio_peak_dbfs,
        "samples": agg.samples,
    }


class HistoryService:
    """Records downsampled channel samples, answers chart queries and prunes old rows."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        bucket_s: int = 60,
        retention_days: float = 30.0,
        flush_interval_s: float = 10.0,
        prune_interval_s: float = 3600.0,
        max_pending: int = 100_000,
    ) -> None:
        if bucket_s < 1:
            raise ValueError("bucket_s must be at least 1")
        self.engine = engine
        self.bucket_ms = bucket_s * 1000
        self.retention_ms = int(retention_days * 86_400_000)
        self.flush_interval_s = flush_interval_s
        self.prune_interval_s = prune_interval_s
        self.max_pending = max_pending
        self.stats = HistoryStats()
        self._pending: dict[_Key, _Aggregate] = {}
        # The buckets of the pending aggregates, and those a flush has taken and not written yet:
        # a query looks a channel's unwritten aggregates up by key instead of scanning them all.
        self._pending_buckets: set[int] = set()
        self._flushing: dict[_Key, _Aggregate] = {}
        self._flushing_buckets: set[int] = set()
        self._prepared: dict[str, Prepared] = {}
        self._task: asyncio.Task[None] | None = None
        # Set by close(): the periodic task stops, and a flush in progress stops pausing.
        self._closing = asyncio.Event()

    # -- recording (synchronous, in memory) ---------------------------------------------------

    def _aggregate(
        self, site: str, agent: str, device_key: str, channel: int, now_ms: int
    ) -> _Aggregate | None:
        key = (agent, device_key, channel, now_ms - now_ms % self.bucket_ms)
        aggregate = self._pending.get(key)
        if aggregate is None:
            if len(self._pending) >= self.max_pending:
                self.stats.dropped += 1
                return None
            aggregate = self._pending[key] = _Aggregate(site)
            self._pending_buckets.add(key[3])
        self.stats.recorded += 1
        aggregate.samples += 1
        return aggregate

    def record_device(self, site: str, agent: str, device: Device, *, now_ms: int | None = None) -> None:
        """Sample the battery of every channel with a transmitter reporting one."""
        self.record_battery(
            site,
            agent,
            device.device_key,
            [
                (c.index, c.transmitter.battery_percent, c.transmitter.battery_bars)
                for c in device.channels
                if c.transmitter is not None
            ],
            now_ms=now_ms,
        )

    def record_battery(
        self,
        site: str,
        agent: str,
        device_key: str,
        readings: Iterable[tuple[int, int | None, int | None]],
        *,
        now_ms: int | None = None,
    ) -> None:
        """Sample battery readings given as ``(channel, percent, bars)``; unknown readings are skipped.

        The ingest path calls this with the stored JSON state, without building a :class:`Device`.
        """
        now = _now_ms() if now_ms is None else now_ms
        for index, percent, bars in readings:
            if percent is None and bars is None:
                continue
            aggregate = self._aggregate(site, agent, device_key, index, now)
            if aggregate is not None:
                aggregate.battery_percent = _min(aggregate.battery_percent, percent)
                aggregate.battery_bars = _min(aggregate.battery_bars, bars)

    def record_meter(self, site: str, agent: str, meter: MeterBody, *, now_ms: int | None = None) -> None:
        """Sample RF (best antenna) and audio levels of each metered channel."""
        now = _now_ms() if now_ms is None else now_ms
        for channel in meter.channels:
            known = [v for v in channel.rf_dbm if v is not None]
            rf = max(known) if known else None
            if rf is None and channel.audio_dbfs is None and channel.audio_peak_dbfs is None:
                continue
            aggregate = self._aggregate(site, agent, meter.device_key, channel.index, now)
            if aggregate is not None:
                aggregate.rf_dbm = _max(aggregate.rf_dbm, rf)
                aggregate.rf_dbm_min = _min(aggregate.rf_dbm_min, rf)
                aggregate.audio_dbfs = _max(aggregate.audio_dbfs, channel.audio_dbfs)
                aggregate.audio_peak_dbfs = _max(aggregate.audio_peak_dbfs, channel.audio_peak_dbfs)

    @property
    def pending(self) -> int:
        """How many aggregates wait to be flushed."""
        return len(self._pending)

    # -- writing ------------------------------------------------------------------------------

    async def flush(self, *, spread_s: float = 0.0) -> int:
        """Write every pending aggregate, merging with rows already stored; returns rows written.

        Rows go in transactions of :data:`FLUSH_CHUNK` with a pause between two, spread over
        ``spread_s`` at most: on SQLite, ingest's batches wait for the write lock meanwhile, and
        a fleet's samples written in one go held them up for seconds. Aggregates a failed write
        did not store are kept for the next flush (merged with what arrived meanwhile).
        """
        if not self._pending:
            return 0
        items = list(self._pending.items())
        self._flushing.update(self._pending)
        self._flushing_buckets |= self._pending_buckets
        self._pending, self._pending_buckets = {}, set()
        chunks = -(-len(items) // FLUSH_CHUNK)
        gap = max(FLUSH_PAUSE_S, spread_s / chunks) if chunks > 1 else 0.0
        written = 0
        try:
            for start in range(0, len(items), FLUSH_CHUNK):
                if start:
                    await pause(self._closing, gap)
                chunk = items[start : start + FLUSH_CHUNK]
                async with write_turn(self.engine), self.engine.begin() as conn:
                    await self._upsert(conn).executemany(conn, [_row(key, agg) for key, agg in chunk])
                written += len(chunk)
                self.stats.flushed_rows += len(chunk)
                self._written(chunk)
        except BaseException:
            self._keep(items[written:])
            self._written(items[written:])
            raise
        return written

    def _written(self, items: list[tuple[_Key, _Aggregate]]) -> None:
        """Forget aggregates a flush has stored (or put back as pending): queries read them there."""
        flushing = self._flushing
        for key, agg in items:
            if flushing.get(key) is agg:  # not one a concurrent flush took later
                del flushing[key]
        if not flushing:
            self._flushing_buckets = set()

    def _upsert(self, conn: AsyncConnection) -> Prepared:
        prepared = self._prepared.get(conn.dialect.name)
        if prepared is None:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            # Only the columns a row holds: compiled without values, every column (the id) binds.
            columns = _row(("", "", 0, 0), _Aggregate(""))
            statement = dialect.insert(history_samples).values({c: bindparam(c) for c in columns})
            new = statement.excluded
            table = history_samples.c
            statement = statement.on_conflict_do_update(
                index_elements=[table.agent, table.device_key, table.channel, table.bucket_ms],
                set_={
                    "battery_percent": _least(table.battery_percent, new.battery_percent),
                    "battery_bars": _least(table.battery_bars, new.battery_bars),
                    "rf_dbm": _greatest(table.rf_dbm, new.rf_dbm),
                    "rf_dbm_min": _least(table.rf_dbm_min, new.rf_dbm_min),
                    "audio_dbfs": _greatest(table.audio_dbfs, new.audio_dbfs),
                    "audio_peak_dbfs": _greatest(table.audio_peak_dbfs, new.audio_peak_dbfs),
                    "samples": table.samples + new.samples,
                },
            )
            prepared = self._prepared[conn.dialect.name] = prepare(statement, conn.dialect)
        return prepared

    def _keep(self, items: list[tuple[_Key, _Aggregate]]) -> None:
        """Put unwritten aggregates back, folded into any that arrived since (bounded as recording is)."""
        for key, agg in items:
            current = self._pending.get(key)
            if current is None:
                if len(self._pending) >= self.max_pending:
                    self.stats.dropped += agg.samples
                    continue
                self._pending[key] = agg
                self._pending_buckets.add(key[3])
                continue
            _fold(current, agg)

    async def prune(self, now_ms: int | None = None) -> int:
        """Delete rows older than the retention period; returns how many."""
        now = _now_ms() if now_ms is None else now_ms
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(history_samples).where(history_samples.c.bucket_ms < now - self.retention_ms)
            )
        self.stats.pruned_rows += result.rowcount
        return result.rowcount

    # -- reading ------------------------------------------------------------------------------

    async def query(
        self,
        agent: str,
        device_key: str,
        channel: int,
        *,
        start_ms: int,
        end_ms: int,
        resolution_s: int | None = None,
    ) -> list[HistoryPoint]:
        """A channel's points in ``[start_ms, end_ms)``, at ``resolution_s`` (a bucket multiple).

        Stored rows and this process's aggregates not written yet, folded alike.
        """
        resolution_ms = self.bucket_ms if resolution_s is None else resolution_s * 1000
        if end_ms <= start_ms:
            raise InvalidHistoryQueryError("end_ms must be after start_ms")
        if resolution_ms < self.bucket_ms or resolution_ms % self.bucket_ms:
            raise InvalidHistoryQueryError(
                f"resolution_s must be a multiple of the {self.bucket_ms // 1000} s bucket"
            )
        if (end_ms - start_ms) // resolution_ms > MAX_POINTS:
            raise InvalidHistoryQueryError(
                f"the range holds more than {MAX_POINTS} points at this resolution"
            )
        table = history_samples.c
        # Rendered as a literal (it is an int we computed) so that SELECT and GROUP BY are the
        # same expression to PostgreSQL; bound parameters would differ and be refused.
        width: ColumnElement[int] = literal_column(str(int(resolution_ms)), BigInteger)
        bucket = ((table.bucket_ms // width) * width).label("bucket")
        query = (
            select(
                bucket,
                func.min(table.battery_percent),
                func.min(table.battery_bars),
                func.max(table.rf_dbm),
                func.min(table.rf_dbm_min),
                func.max(table.audio_dbfs),
                func.max(table.audio_peak_dbfs),
                func.sum(table.samples),
            )
            .where(
                table.agent == agent,
                table.device_key == device_key,
                table.channel == channel,
                table.bucket_ms >= start_ms,
                table.bucket_ms < end_ms,
            )
            .group_by(bucket)
            .order_by(bucket)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        points = {
            int(row[0]): HistoryPoint(
                bucket_ms=int(row[0]),
                battery_percent=row[1],
                battery_bars=row[2],
                rf_dbm=row[3],
                rf_dbm_min=row[4],
                audio_dbfs=row[5],
                audio_peak_dbfs=row[6],
                samples=int(row[7] or 0),
            )
            for row in rows
        }
        # An aggregate whose chunk commits while this reads may, for this one answer, be in both
        # (its samples counted twice, its extremes the same) or in neither; the next is exact.
        for bucket_ms, agg in self._unwritten(agent, device_key, channel, start_ms, end_ms):
            point = bucket_ms - bucket_ms % resolution_ms
            folded = _Aggregate(agg.site)
            stored = points.get(point)
            if stored is not None:
                _fold(folded, stored)
            _fold(folded, agg)
            points[point] = HistoryPoint(
                bucket_ms=point,
                battery_percent=folded.battery_percent,
                battery_bars=folded.battery_bars,
                rf_dbm=folded.rf_dbm,
                rf_dbm_min=folded.rf_dbm_min,
                audio_dbfs=folded.audio_dbfs,
                audio_peak_dbfs=folded.audio_peak_dbfs,
                samples=folded.samples,
            )
        return [points[key] for key in sorted(points)]

    async def knows_channel(self, agent: str, device_key: str, channel: int) -> bool:
        """Whether the device's stored state lists ``channel``, or history holds samples of it.

        A channel the device no longer reports (a receiver reconfigured, or swapped for a smaller
        model at the same address) keeps its samples until retention prunes them: they are
        still worth a chart. The channel rows are the stored state's, kept with it.
        """
        key = (agent, device_key, channel)
        for aggregates, buckets in (
            (self._pending, self._pending_buckets),
            (self._flushing, self._flushing_buckets),
        ):
            if any((*key, bucket_ms) in aggregates for bucket_ms in buckets):
                return True
        listed = (
            select(channels.c.index)
            .join_from(channels, devices, devices.c.id == channels.c.device_pk)
            .where(devices.c.agent == agent, devices.c.device_key == device_key, channels.c.index == channel)
        )
        table = history_samples.c
        sampled = select(table.id).where(
            table.agent == agent, table.device_key == device_key, table.channel == channel
        )
        async with self.engine.connect() as conn:
            found = (await conn.execute(select(or_(listed.exists(), sampled.exists())))).scalar()
        return bool(found)

    def _unwritten(
        self, agent: str, device_key: str, channel: int, start_ms: int, end_ms: int
    ) -> list[tuple[int, _Aggregate]]:
        """The channel's aggregates in ``[start_ms, end_ms)`` that no flush has stored yet."""
        found = []
        for aggregates, buckets in (
            (self._pending, self._pending_buckets),
            (self._flushing, self._flushing_buckets),
        ):
            for bucket_ms in buckets:
                if start_ms <= bucket_ms < end_ms:
                    agg = aggregates.get((agent, device_key, channel, bucket_ms))
                    if agg is not None:
                        found.append((bucket_ms, agg))
        return found

    # -- the periodic job ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the periodic flush and prune task (idempotent)."""
        if self._task is None:
            self._closing = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="history")

    async def close(self) -> None:
        """Stop the periodic task and flush what is pending.

        A flush in progress finishes, without its pauses, rather than being cancelled in the
        middle of a transaction (whose connection could then keep SQLite's write lock).
        """
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            _done, overrun = await asyncio.wait([task], timeout=CLOSE_GRACE_S)
            if overrun:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _run(self) -> None:
        next_prune = time.monotonic()
        # Out of step with the collector's other periodic jobs, which start with it.
        if not await pause(self._closing, self.flush_interval_s / 8):
            return
        while await pause(self._closing, self.flush_interval_s):
            try:
                # Spread over half the interval: the next flush never overlaps this one.
                await self.flush(spread_s=self.flush_interval_s / 2)
                if time.monotonic() >= next_prune:
                    await self.prune()
                    next_prune = time.monotonic() + self.prune_interval_s
            except Exception:  # the store may be briefly unavailable; try again next interval
                self.stats.failed_flushes += 1
                log.exception("history flush or prune failed")
