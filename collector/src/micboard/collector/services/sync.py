"""SynchronizationService: apply agent events to the store, idempotently, in batches, in any order.

A batch costs a fixed handful of statements whatever its size: one insert claims the
``(agent, boot, seq)`` of every event (duplicates fall out of it), one upsert each for sites,
agents and discovered answers, one locking select of the devices concerned, then bulk writes.

A service whose caller reports commits (:meth:`SynchronizationService.committed`, as ingest
does) keeps the devices it wrote in memory: the locking select then reads only their
``revision``, and the whole state only of a device another collector wrote meanwhile. Sites and
agents it marked seen less than five seconds ago are not rewritten.

Events may arrive out of order (several collectors share one consumer, redeliveries come late).
Device state therefore keeps a version per field within a boot: an older event only fills in
the fields no newer event has set, so applying the same events in any order gives the same state.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import Table, bindparam, case, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from micboard.collector.store.keys import composite_in, ints_in
from micboard.collector.store.prepared import prepare, write_locked_sqlite
from micboard.collector.store.schema import agents, applied_events, channels, devices, discovered, sites
from micboard.collector.store.upsert import insert_for
from micboard.shared.envelope import (
    AnyEvent,
    DeviceEvent,
    DiscoveredEvent,
    HeartbeatEvent,
    HelloEvent,
    OfflineEvent,
)
from micboard.shared.model import ReceiverChannel, Transmitter, split_channel_name

# A channel's name is split for every row written, and names rarely change.
_split_name = functools.lru_cache(maxsize=65_536)(split_channel_name)

log = logging.getLogger(__name__)

#: An agent is stale once nothing arrived from it for this many heartbeat intervals.
STALE_AFTER_INTERVALS = 3

_STORED = (HelloEvent, HeartbeatEvent, DeviceEvent, OfflineEvent, DiscoveredEvent)
# Canonical (JSON-mode) defaults: a channel or transmitter set by a delta is stored whole,
# in the same shape a snapshot has, so readers never see a partial object.
_CHANNEL_DEFAULTS: dict[str, Any] = ReceiverChannel(index=1).model_dump(mode="json")
_TRANSMITTER_DEFAULTS: dict[str, Any] = Transmitter().model_dump(mode="json")
_STATUS = "status"
_TOUCH_RESOLUTION_MS = 5000  # staleness counts in heartbeat intervals (10 s), which are always written
_WORK_COLUMNS = [
    devices.c[name]
    for name in (
        "id", "agent", "device_key", "site", "state", "reported_status",
        "last_boot", "last_seq", "last_ts", "base_seq", "field_seq", "revision",
    )
]  # fmt: skip
# ``WHERE true``: SQLite's parser needs it between an INSERT's SELECT and its upsert clause.
_CLAIM_SQLITE = (
    "INSERT INTO applied_events (agent, boot, seq, applied_ms) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), ? "
    "FROM json_each(?) WHERE true ON CONFLICT DO NOTHING RETURNING agent, boot, seq"
)
_CLAIM_POSTGRESQL = (
    "INSERT INTO applied_events (agent, boot, seq, applied_ms) "
    "SELECT k.agent, k.boot, k.seq, $4 FROM unnest($1::varchar[], $2::varchar[], $3::bigint[]) "
    "AS k(agent, boot, seq) ON CONFLICT DO NOTHING RETURNING agent, boot, seq"
)
# The revision of each known device of a batch, in id order (PostgreSQL: locking the rows).
_REVISIONS_SQLITE = (
    "SELECT id, agent, device_key, revision FROM devices "
    "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
)
_REVISIONS_POSTGRESQL = (
    "SELECT id, agent, device_key, revision FROM devices WHERE id = ANY($1::integer[]) ORDER BY id FOR UPDATE"
)
# The agents of a batch that were stale are online again: their (site, agent).
_BACK_SQLITE = (
    "UPDATE agents SET status = 'online' "
    "WHERE agent IN (SELECT value FROM json_each(?)) AND status = 'stale' RETURNING site, agent"
)
_BACK_POSTGRESQL = (
    "UPDATE agents SET status = 'online' "
    "WHERE agent = ANY($1::varchar[]) AND status = 'stale' RETURNING site, agent"
)
#: How long after an agent's start (its grace included) its unreported devices are looked for.
UNREPORTED_WINDOW_MS = 24 * 3600 * 1000
#: Devices whose state a service keeps in memory between batches (about 2 KB each).
DEFAULT_DEVICE_CACHE = 50_000


class ApplyOutcome(StrEnum):
    """What applying one event did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # (agent, boot, seq) seen before: a no-op
    OUTDATED = "outdated"  # older than the state already applied for that device
    IGNORED = "ignored"  # a kind this service does not store
    REJECTED = "rejected"  # valid on the wire but inconsistent with what is stored
    DEFERRED = "deferred"  # needs an event not applied yet (a delta before its snapshot): retry later


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The typed result of applying one event."""

    outcome: ApplyOutcome
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device by its place in the fleet."""

    site: str
    agent: str
    device_key: str


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """A device a batch wrote: its stored state (JSON mode) and reported status before and after.

    ``before`` is ``None`` for a device the batch created. Several events of one device in a
    batch make one change, from the state before the batch to the state after it.
    """

    site: str
    agent: str
    device_key: str
    before: dict[str, Any] | None
    after: dict[str, Any]
    status_before: str | None
    status_after: str
    # The device's row id and the batch's ``updated_ms``, as written with ``after``.
    pk: int | None = None
    updated_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _Cached:
    """A device row as committed, kept between batches; valid while ``revision`` matches the row."""

    pk: int
    revision: int
    site: str
    state: dict[str, Any]
    reported_status: str
    last_boot: str
    last_seq: int
    last_ts: int
    base_seq: int
    field_seq: dict[str, int]

    def work(self, key: tuple[str, str]) -> _DeviceState:
        """A working copy of device ``key``: the state and versions may change, the cached ones do not."""
        return _DeviceState(
            pk=self.pk, agent=key[0], device_key=key[1], site=self.site,
            # Shallow copies: writes replace values or copy a channel first (see _set).
            state={**self.state, "channels": list(self.state["channels"])},
            reported_status=self.reported_status, last_boot=self.last_boot, last_seq=self.last_seq,
            last_ts=self.last_ts, base_seq=self.base_seq, field_seq=dict(self.field_seq),
            revision=self.revision, before=self.state, status_before=self.reported_status,
        )  # fmt: skip


def _cached(row: Any) -> _Cached:
    """A device row of :data:`_WORK_COLUMNS` as kept between batches."""
    return _Cached(
        pk=row.id, revision=row.revision, site=row.site, state=row.state,
        reported_status=row.reported_status, last_boot=row.last_boot, last_seq=row.last_seq,
        last_ts=row.last_ts, base_seq=row.base_seq, field_seq=dict(row.field_seq or {}),
    )  # fmt: skip


@dataclass(slots=True)
class _Memo:
    """What a batch wrote, remembered by :meth:`SynchronizationService.committed` once it commits."""

    sites: dict[str, int] = field(default_factory=dict)
    agents: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    devices: dict[tuple[str, str], _Cached] = field(default_factory=dict)


@dataclass(slots=True)
class BatchChanges:
    """What :meth:`SynchronizationService.apply_batch_changes` did, for the caller's after-commit work."""

    results: list[ApplyResult]
    devices: list[DeviceChange] = field(default_factory=list)
    # Agents heard again after being stale, and their devices, whose shown status changed back.
    agents_back: list[tuple[str, str]] = field(default_factory=list)
    restored: list[DeviceRef] = field(default_factory=list)
    # For SynchronizationService.committed: only a committed batch may be remembered.
    memo: _Memo = field(default_factory=_Memo, repr=False)


@dataclass(frozen=True, slots=True)
class StaleChanges:
    """What :meth:`SynchronizationService.mark_stale` changed: agents (site, agent) and their devices."""

    agents: list[tuple[str, str]]
    devices: list[DeviceRef]


_DUPLICATE = ApplyResult(ApplyOutcome.DUPLICATE)
_OUTDATED = ApplyResult(ApplyOutcome.OUTDATED)
_APPLIED = ApplyResult(ApplyOutcome.APPLIED)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _agent_changed(ins: Any, columns: tuple[str, ...]) -> Any:
    # Rewriting every agent row of every batch only to move ``last_seen_ms`` by milliseconds
    # costs more than the rest of the batch; five seconds of resolution are plenty for staleness.
    changed = agents.c.last_seen_ms < ins.excluded.last_seen_ms - _TOUCH_RESOLUTION_MS
    changed = or_(changed, agents.c.status != ins.excluded.status, agents.c.boot != ins.excluded.boot)
    if "version" in columns or "last_heartbeat_ms" in columns:
        return None  # hello or heartbeat: always written
    return changed


_HELLO_COLUMNS = ("version", "hostname", "started_ms", "started_seen_ms")


def _agent_column(ins: Any, column: str) -> Any:
    if column in _HELLO_COLUMNS:
        # The newest hello wins: one of an earlier boot applied late (two collectors, a drained
        # outbox) must not make devices reported since look unreported, nor the agent older.
        newer = or_(agents.c.started_ms.is_(None), ins.excluded.started_ms >= agents.c.started_ms)
        return case((newer, ins.excluded[column]), else_=agents.c[column])
    return ins.excluded[column]


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _driver_rows(
    conn: AsyncConnection, sqlite_sql: str, postgresql_sql: str, values: list[Any]
) -> Sequence[Any]:
    """The rows of a statement taking one list of ``values``: JSON text (SQLite), an array (PostgreSQL).

    For statements after a batch's claim, which took SQLite's write lock (see :func:`write_locked_sqlite`).
    """
    if conn.dialect.name == "postgresql":
        return (await conn.exec_driver_sql(postgresql_sql, (values,))).all()
    parameter = (orjson.dumps(values).decode(),)
    db = await write_locked_sqlite(conn)
    if db is not None:
        return db.execute(sqlite_sql, parameter).fetchall()
    return (await conn.exec_driver_sql(sqlite_sql, parameter)).all()


def _is_deferred(result: ApplyResult | None) -> bool:
    return result is not None and result.outcome is ApplyOutcome.DEFERRED


@dataclass(slots=True, eq=False)
class _DeviceState:
    """A device row being worked on in memory for the length of one batch."""

    pk: int | None
    agent: str
    device_key: str
    site: str
    state: dict[str, Any]
    reported_status: str
    last_boot: str
    last_seq: int
    last_ts: int
    base_seq: int
    field_seq: dict[str, int]
    revision: int = 0
    dirty: bool = False
    replaced: bool = False  # a snapshot replaced the state: rewrite every channel row
    touched: set[int] = field(default_factory=set)  # channels a delta changed: rewrite those rows
    # The state as loaded, never mutated (channels are copied on first write), and its status.
    before: dict[str, Any] | None = None
    status_before: str | None = None

    def written(self) -> _Cached:
        """The row as this batch wrote it (``pk`` set), to remember once the batch commits."""
        assert self.pk is not None, "written() after the row has its id"
        return _Cached(
            pk=self.pk, revision=self.revision, site=self.site, state=self.state,
            reported_status=self.reported_status, last_boot=self.last_boot, last_seq=self.last_seq,
            last_ts=self.last_ts, base_seq=self.base_seq, field_seq=self.field_seq,
        )  # fmt: skip

    def version(self, path: str) -> int:
        return self.field_seq.get(path, self.base_seq)


@dataclass(slots=True)
class _AgentUpdate:
    site: str
    boot: str
    ts: int
    values: dict[str, Any] = field(default_factory=dict)


def _channel(state: dict[str, Any], index: int) -> dict[str, Any]:
    for channel in state["channels"]:
        if channel["index"] == index:
            return channel  # type: ignore[no-any-return]
    created = {**_CHANNEL_DEFAULTS, "index": index}
    state["channels"] = sorted([*state["channels"], created], key=lambda c: c["index"])
    return created


def _canonical(key: str, value: Any) -> Any:
    if key == "transmitter" and isinstance(value, dict):
        return {**_TRANSMITTER_DEFAULTS, **value}
    return value


def _snapshot_fields(state: dict[str, Any]) -> Iterable[tuple[str, int | None, str, Any]]:
    """Every field of a JSON-mode device as ``(path, channel index or None, key, value)``."""
    for key, value in state.items():
        if key not in ("channels", "device_key"):
            yield key, None, key, value
    for channel in state["channels"]:
        index = channel["index"]
        for key, value in channel.items():
            if key != "index":
                yield f"ch.{index}.{key}", index, key, value


def _delta_fields(changes: dict[str, Any]) -> Iterable[tuple[str, int | None, str, Any]]:
    """Every field of a delta as ``(path, channel index or None, key, value)``."""
    for key, value in changes.items():
        if key != "channels":
            yield key, None, key, value
    for raw_index, diff in (changes.get("channels") or {}).items():
        index = int(raw_index)
        for key, value in diff.items():
            if key != "index":
                yield f"ch.{index}.{key}", index, key, value


def _set(work: _DeviceState, index: int | None, key: str, value: Any) -> None:
    if index is None:
        work.state[key] = value
        return
    if index not in work.touched:
        # Copy-on-write: the loaded channel dict is shared with ``before``, the alerts' baseline.
        listed = work.state["channels"]
        for position, channel in enumerate(listed):
            if channel["index"] == index:
                listed[position] = dict(channel)
                break
        work.touched.add(index)
    _channel(work.state, index)[key] = _canonical(key, value)


def channel_rows(pk: int, state: dict[str, Any], only: set[int] | None = None) -> list[dict[str, Any]]:
    """The ``channels`` rows of device ``pk`` in ``state`` (of the channels in ``only``, if given)."""
    rows = []
    for channel in state["channels"]:
        if only is not None and channel["index"] not in only:
            continue
        tx = channel.get("transmitter")
        name_id, name_person = _split_name(channel.get("name"))
        rows.append(
            {
                "device_pk": pk,
                "index": channel["index"],
                "name": channel.get("name"),
                "name_id": name_id,
                "name_person": name_person,
                "frequency_khz": channel.get("frequency_khz"),
                "tx_present": tx is not None,
                "tx_model": tx.get("model") if tx else None,
                "battery_bars": tx.get("battery_bars") if tx else None,
                "battery_percent": tx.get("battery_percent") if tx else None,
                "runtime_min": tx.get("runtime_min") if tx else None,
                "tx_muted": tx.get("muted") if tx else None,
                "group_channel": channel.get("group_channel"),
                "battery_type": tx.get("battery_type") if tx else None,
            }
        )
    return rows


def _device_columns(work: _DeviceState, now: int) -> dict[str, Any]:
    state = work.state
    return {
        "site": work.site,
        "vendor": state["vendor"],
        "family": state["family"],
        "model": state.get("model"),
        "device_id": state.get("device_id"),
        "firmware": state.get("firmware"),
        "address": state.get("address"),
        "name": state.get("name"),
        # Any event of the batch made its agent online again, so the desk sees the agent's word.
        "status": work.reported_status,
        "reported_status": work.reported_status,
        "state": state,
        "last_boot": work.last_boot,
        "last_seq": work.last_seq,
        "last_ts": work.last_ts,
        "base_seq": work.base_seq,
        "field_seq": work.field_seq,
        "updated_ms": now,
        "revision": work.revision,
    }


class SynchronizationService:
    """Applies hello, heartbeat, device, offline and discovered events inside a caller's transaction."""

    def __init__(self, *, device_cache: int = DEFAULT_DEVICE_CACHE) -> None:
        # Built statements by (dialect, name): building an upsert (its ``excluded`` columns above
        # all) costs more than running it, and the compiled form is cached by SQLAlchemy anyway.
        self._statements: dict[tuple[str, str], Any] = {}
        self._device_pks: dict[tuple[str, str], int] = {}
        # What committed batches wrote (see committed()): a batch then reads back only the
        # revisions of its devices instead of their whole state, and skips rewriting sites and
        # agents it touched less than a second ago. Filled only by callers that report commits.
        self.device_cache = device_cache
        self._devices: dict[tuple[str, str], _Cached] = {}
        self._sites_touched: dict[str, int] = {}
        self._agents_touched: dict[str, tuple[str, str, int]] = {}

    def committed(self, changes: BatchChanges) -> None:
        """Remember what a batch wrote, once its transaction has committed.

        Optional: a caller that never reports commits gets the same results, reading each
        batch's devices from the database. Never call it for a rolled-back transaction.
        """
        memo = changes.memo
        self._sites_touched.update(memo.sites)
        self._agents_touched.update(memo.agents)
        cache = self._devices
        for key, cached in memo.devices.items():
            cache.pop(key, None)  # re-inserted last: the oldest entries are evicted first
            cache[key] = cached
        excess = len(cache) - self.device_cache
        if excess > 0:
            for key in list(itertools.islice(cache, excess)):
                del cache[key]
        for touched in (self._sites_touched, self._agents_touched):
            if len(touched) > self.device_cache:
                touched.clear()  # a fleet this size re-learns them within a second

    def _statement(self, conn: AsyncConnection, name: str, build: Callable[[Any], Any], table: Table) -> Any:
        key = (conn.dialect.name, name)
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = build(insert_for(conn, table))
        return stmt

    async def apply(self, conn: AsyncConnection, event: AnyEvent) -> ApplyResult:
        """Apply one event; the caller owns the transaction."""
        return (await self.apply_batch(conn, [event]))[0]

    async def apply_batch(self, conn: AsyncConnection, events: Sequence[AnyEvent]) -> list[ApplyResult]:
        """Apply ``events`` in order inside the caller's transaction; one result per event.

        Nothing is committed here. A :attr:`ApplyOutcome.DEFERRED` event is left unrecorded so
        that its redelivery is applied later.
        """
        return (await self.apply_batch_changes(conn, events)).results

    async def apply_batch_changes(self, conn: AsyncConnection, events: Sequence[AnyEvent]) -> BatchChanges:
        """Like :meth:`apply_batch`, also returning each written device's state before and after.

        The before/after states come from the rows the batch loads and writes anyway: no extra query.
        """
        now = _now_ms()
        changes = BatchChanges([])
        results: list[ApplyResult | None] = [None] * len(events)
        first_of: dict[tuple[str, str, int], int] = {}
        for i, event in enumerate(events):
            if not isinstance(event, _STORED):
                results[i] = ApplyResult(ApplyOutcome.IGNORED, f"{event.kind} events are not stored")
                continue
            key = (event.agent, event.boot, event.seq)
            if key in first_of:
                results[i] = _DUPLICATE
            else:
                first_of[key] = i
        if not first_of:
            changes.results = [r or _DUPLICATE for r in results]
            return changes
        # Claiming first also takes SQLite's write lock before anything is read, so two
        # writers cannot both read a device and then overwrite each other's update.
        claimed = await self._claim(conn, list(first_of), now)
        fresh: list[int] = []
        for key, i in first_of.items():
            if key in claimed:
                fresh.append(i)
            else:
                results[i] = _DUPLICATE
        fresh.sort()
        if fresh:
            await self._touch_agents(conn, [events[i] for i in fresh], now, changes)
            changes.devices = await self._apply_devices(conn, events, fresh, results, now, changes.memo)
            await self._apply_discovered(conn, events, fresh)
            deferred = [events[i] for i in fresh if _is_deferred(results[i])]
            if deferred:
                await self._unclaim(conn, deferred)
        changes.results = [r or _APPLIED for r in results]
        return changes

    async def _claim(
        self, conn: AsyncConnection, keys: list[tuple[str, str, int]], now: int
    ) -> set[tuple[str, str, int]]:
        # One statement and one parameter per column whatever the batch size: the keys travel
        # as arrays (PostgreSQL) or one JSON text (SQLite) instead of a bound row per event,
        # whose per-row parameter processing cost more than the insert itself.
        if conn.dialect.name == "postgresql":
            result = await conn.exec_driver_sql(
                _CLAIM_POSTGRESQL,
                ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], now),
            )
        else:
            result = await conn.exec_driver_sql(_CLAIM_SQLITE, (now, orjson.dumps(keys).decode()))
        rows: Sequence[Any] = result.all()
        return {(r[0], r[1], r[2]) for r in rows}

    async def _unclaim(self, conn: AsyncConnection, events: list[AnyEvent]) -> None:
        keys = [(e.agent, e.boot, e.seq) for e in events]
        await conn.execute(
            delete(applied_events).where(
                composite_in(
                    (applied_events.c.agent, applied_events.c.boot, applied_events.c.seq),
                    keys,
                    conn.dialect.name,
                )
            )
        )

    async def _touch_agents(
        self, conn: AsyncConnection, events: list[AnyEvent], now: int, changes: BatchChanges
    ) -> None:
        """Upsert the sites and agents of ``events``, bringing stale agents and their devices back."""
        site_seen: set[str] = set()
        updates: dict[str, _AgentUpdate] = {}
        for event in events:
            site_seen.add(event.site)
            upd = updates.get(event.agent)
            if upd is None:
                upd = updates[event.agent] = _AgentUpdate(event.site, event.boot, event.ts)
            elif event.ts >= upd.ts:
                upd.site, upd.boot, upd.ts = event.site, event.boot, event.ts
            if isinstance(event, HelloEvent):
                if event.ts >= upd.values.get("started_ms", -1):  # the newest hello of the batch
                    upd.values.update(
                        version=event.body.version,
                        hostname=event.body.hostname,
                        started_ms=event.ts,
                        started_seen_ms=now,
                    )
            elif isinstance(event, HeartbeatEvent):
                upd.values.update(
                    last_heartbeat_ms=now,
                    heartbeat_interval_s=event.body.interval_s,
                    outbox_depth=event.body.outbox_depth,
                    dropped=event.body.dropped,
                )
        # Sorted keys: concurrent collectors lock rows in one order and cannot deadlock.
        site_stmt = self._statement(
            conn,
            "sites",
            lambda ins: ins.on_conflict_do_update(
                index_elements=[sites.c.site],
                set_={"last_seen_ms": ins.excluded.last_seen_ms},
                where=sites.c.last_seen_ms < ins.excluded.last_seen_ms - _TOUCH_RESOLUTION_MS,
            ),
            sites,
        )
        # A site this collector marked seen less than the resolution ago would not be written.
        due = [
            s
            for s in sorted(site_seen)
            if now - self._sites_touched.get(s, -_TOUCH_RESOLUTION_MS) >= _TOUCH_RESOLUTION_MS
        ]
        if due:
            rows = [{"site": s, "first_seen_ms": now, "last_seen_ms": now} for s in due]
            await conn.execute(site_stmt, rows)
            changes.memo.sites.update(dict.fromkeys(due, now))
        # Straight through the driver: it runs for every batch, and almost always finds nothing.
        back_rows = await _driver_rows(conn, _BACK_SQLITE, _BACK_POSTGRESQL, sorted(updates))
        if back_rows:
            back = sorted(row[1] for row in back_rows)
            # The desk sees the devices as the agent last reported them again.
            restored = await conn.execute(
                update(devices)
                .where(devices.c.agent.in_(back), devices.c.status == "stale")
                .values(status=devices.c.reported_status)
                .returning(devices.c.site, devices.c.agent, devices.c.device_key)
            )
            changes.agents_back = sorted((row[0], row[1]) for row in back_rows)
            changes.restored = [DeviceRef(r.site, r.agent, r.device_key) for r in restored.all()]
            log.info("stale agents are back", extra={"agents": ",".join(back)})
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for agent in sorted(updates):
            upd = updates[agent]
            touched = self._agents_touched.get(agent)
            if (
                not upd.values
                and touched is not None
                and touched[:2] == (upd.site, upd.boot)
                and now - touched[2] < _TOUCH_RESOLUTION_MS
            ):
                # Written as online with this site and boot just now: only ``last_seen_ms`` would
                # move, by less than its resolution (a stale agent was brought back above).
                continue
            changes.memo.agents[agent] = (upd.site, upd.boot, now)
            row = {
                "agent": agent,
                "site": upd.site,
                "boot": upd.boot,
                "status": "online",
                "last_seen_ms": now,
            }
            row.update(upd.values)
            by_columns.setdefault(tuple(sorted(row)), []).append(row)
        for columns, rows in by_columns.items():
            stmt = self._statement(
                conn,
                "agents:" + ",".join(columns),
                lambda ins, columns=columns: ins.on_conflict_do_update(  # type: ignore[misc]
                    index_elements=[agents.c.agent],
                    set_={c: _agent_column(ins, c) for c in columns if c != "agent"},
                    where=_agent_changed(ins, columns),
                ),
                agents,
            )
            await conn.execute(stmt, rows)

    async def _load_devices(
        self, conn: AsyncConnection, pairs: list[tuple[str, str]], memo: _Memo
    ) -> dict[tuple[str, str], _DeviceState]:
        # Known devices are fetched by primary key: a lookup by (agent, device_key) row values
        # is not an index search on SQLite. A cached id is only a hint (the row is checked).
        found: dict[tuple[str, str], _DeviceState] = {}
        wanted = set(pairs)
        by_pk = {pk: pair for pair in pairs if (pk := self._device_pks.get(pair)) is not None}
        if by_pk:
            # One light statement: the revision of every known device (locking the rows on
            # PostgreSQL, in id order). A cached state whose revision still matches is used as is.
            # Straight through the driver: it runs for every batch, and SQLAlchemy's statement
            # and row handling cost more than the lookup.
            rows = await _driver_rows(conn, _REVISIONS_SQLITE, _REVISIONS_POSTGRESQL, sorted(by_pk))
            reload: list[int] = []
            for pk, agent, device_key, revision in rows:
                pair = (agent, device_key)
                if by_pk.get(pk) != pair:
                    continue  # the id was reused for another device: look it up by key below
                cached = self._devices.get(pair)
                if cached is not None and cached.pk == pk and cached.revision == revision:
                    found[pair] = cached.work(pair)
                else:
                    reload.append(pk)
            if reload:
                await self._select_devices(
                    conn, ints_in(devices.c.id, reload, conn.dialect.name), wanted, found, memo
                )
        missing = [pair for pair in pairs if pair not in found]
        if missing:
            await self._select_devices(
                conn,
                composite_in((devices.c.agent, devices.c.device_key), missing, conn.dialect.name),
                wanted,
                found,
                memo,
            )
        return found

    async def _select_devices(
        self,
        conn: AsyncConnection,
        where: Any,
        wanted: set[tuple[str, str]],
        found: dict[tuple[str, str], _DeviceState],
        memo: _Memo,
    ) -> None:
        query = (
            select(*_WORK_COLUMNS)
            .where(where)
            .order_by(devices.c.id)
            # PostgreSQL: hold the rows until commit so that a concurrent collector applying
            # another event of the same device waits and then reads this batch's result.
            .with_for_update()
        )
        for row in (await conn.execute(query)).all():
            key = (row.agent, row.device_key)
            if key not in wanted:
                continue
            self._device_pks[key] = row.id
            cached = memo.devices[key] = _cached(row)
            found[key] = cached.work(key)

    async def warm(self, conn: AsyncConnection, *, limit: int | None = None) -> int:
        """Keep the committed state of the most recently written devices in memory; returns how many.

        For a service whose caller reports commits, at start: otherwise the first event of each
        device reads its whole state, and a collector starting or restarting under a fleet's load
        falls behind for its first seconds. The revision check of every batch still decides
        whether a kept state is current, so a device another collector writes later is read again.
        """
        count = self.device_cache if limit is None else limit
        if count <= 0:
            return 0
        query = select(*_WORK_COLUMNS).order_by(devices.c.updated_ms.desc(), devices.c.id.desc()).limit(count)
        rows = (await conn.execute(query)).all()
        for row in reversed(rows):  # the most recent last: evicted last
            key = (row.agent, row.device_key)
            self._device_pks[key] = row.id
            self._devices.pop(key, None)
            self._devices[key] = _cached(row)
        return len(rows)

    async def _apply_devices(
        self,
        conn: AsyncConnection,
        events: Sequence[AnyEvent],
        fresh: list[int],
        results: list[ApplyResult | None],
        now: int,
        memo: _Memo,
    ) -> list[DeviceChange]:
        mine: list[tuple[int, DeviceEvent | OfflineEvent]] = []
        for i in fresh:
            event = events[i]
            if isinstance(event, DeviceEvent | OfflineEvent):
                mine.append((i, event))
        if not mine:
            return []
        work = await self._load_devices(conn, sorted({(e.agent, e.body.device_key) for _, e in mine}), memo)
        for i, event in mine:
            results[i] = self._merge(work, (event.agent, event.body.device_key), event)
        dirty = [w for w in work.values() if w.dirty]
        if not dirty:
            return []
        for w in dirty:
            # Versions at or below the base say nothing the base does not; keep the map small.
            w.field_seq = {p: s for p, s in w.field_seq.items() if s > w.base_seq}
        new = [w for w in dirty if w.pk is None]
        old = [w for w in dirty if w.pk is not None]
        for w in old:
            # Safe without compare-and-set: the rows are locked (PostgreSQL) or the database
            # is (SQLite, since the claim) until commit.
            w.revision += 1
        if new:
            rows = [{"agent": w.agent, "device_key": w.device_key, **_device_columns(w, now)} for w in new]
            inserted = await conn.execute(
                insert_for(conn, devices).returning(devices.c.id, devices.c.agent, devices.c.device_key),
                rows,
            )
            ids = {(row.agent, row.device_key): row.id for row in inserted.all()}
            for w in new:
                w.pk = self._device_pks[w.agent, w.device_key] = ids[w.agent, w.device_key]
        if old:
            rows = []
            for w in old:
                row = _device_columns(w, now)
                row["pk"] = w.pk
                row["state"], row["field_seq"] = _json_text(row["state"]), _json_text(row["field_seq"])
                rows.append(row)
            await self._executemany(
                conn,
                "devices:update",
                lambda: (
                    update(devices)
                    .where(devices.c.id == bindparam("_pk"))
                    .values({c: bindparam(f"_{c}") for c in _device_columns(old[0], now)})
                ),
                rows,
                prefix="_",
            )
        await self._write_channels(conn, dirty)
        for w in dirty:
            if w.pk is not None:
                memo.devices[w.agent, w.device_key] = w.written()
        return [
            DeviceChange(
                w.site,
                w.agent,
                w.device_key,
                w.before,
                w.state,
                w.status_before,
                w.reported_status,
                w.pk,
                now,
            )
            for w in dirty
        ]

    async def _write_channels(self, conn: AsyncConnection, dirty: list[_DeviceState]) -> None:
        # A snapshot rewrites the device's channel rows (channels may have gone); a delta
        # upserts only the rows of the channels it changed, the common case by far.
        replaced = [w for w in dirty if w.replaced and w.pk is not None]
        if replaced:
            await conn.execute(delete(channels).where(channels.c.device_pk.in_([w.pk for w in replaced])))
            rows = [row for w in replaced if w.pk is not None for row in channel_rows(w.pk, w.state)]
            if rows:
                await conn.execute(channels.insert(), rows)
        rows = [
            row
            for w in dirty
            if not w.replaced and w.touched and w.pk is not None
            for row in channel_rows(w.pk, w.state, w.touched)
        ]
        if rows:
            await self._executemany(
                conn,
                "channels:upsert",
                lambda: (ins := insert_for(conn, channels)).on_conflict_do_update(
                    index_elements=[channels.c.device_pk, channels.c.index],
                    set_={c.name: ins.excluded[c.name] for c in channels.c if not c.primary_key},
                ),
                rows,
            )

    async def _executemany(
        self,
        conn: AsyncConnection,
        name: str,
        build: Callable[[], Any],
        rows: list[dict[str, Any]],
        *,
        prefix: str = "",
    ) -> None:
        """Run a hot statement for many rows straight through the driver (see :func:`prepare`).

        Only after the batch's claim, which took SQLite's write lock.
        """
        key = (conn.dialect.name, name)
        prepared = self._statements.get(key)
        if prepared is None:
            prepared = self._statements[key] = prepare(build(), conn.dialect, prefix=prefix)
        await prepared.executemany(conn, rows, write_locked=True)

    @staticmethod
    def _merge(
        work: dict[tuple[str, str], _DeviceState],
        key: tuple[str, str],
        event: DeviceEvent | OfflineEvent,
    ) -> ApplyResult:
        current = work.get(key)
        snapshot = event.body.snapshot if isinstance(event, DeviceEvent) else None
        if current is None:
            if snapshot is None:
                if isinstance(event, OfflineEvent):
                    return ApplyResult(ApplyOutcome.REJECTED, f"offline for unknown device {key[1]!r}")
                return ApplyResult(ApplyOutcome.DEFERRED, f"delta for unknown device {key[1]!r}")
            work[key] = _DeviceState(
                pk=None, agent=event.agent, device_key=key[1], site=event.site,
                state=snapshot.model_dump(mode="json"), reported_status="online",
                last_boot=event.boot, last_seq=event.seq, last_ts=event.ts,
                base_seq=event.seq, field_seq={}, dirty=True, replaced=True,
            )  # fmt: skip
            return _APPLIED
        if event.boot != current.last_boot:
            if event.ts < current.last_ts:
                return _OUTDATED  # an earlier boot of the agent
            # A new boot: nothing of the old one is comparable by seq any more.
            current.last_boot, current.last_seq, current.last_ts = event.boot, event.seq, event.ts
            current.base_seq, current.field_seq = 0, {}
        elif event.seq > current.last_seq:
            current.last_seq, current.last_ts = event.seq, event.ts
        seq = event.seq
        current.site = event.site
        if (
            snapshot is not None
            and seq >= current.base_seq
            and seq >= max(current.field_seq.values(), default=0)
        ):
            # Newer than every field: the snapshot replaces the state outright.
            current.state = snapshot.model_dump(mode="json")
            current.base_seq, current.field_seq = seq, {}
            current.reported_status = "online"
            current.dirty = current.replaced = True
            return _APPLIED
        if snapshot is not None:
            fields = _snapshot_fields(snapshot.model_dump(mode="json"))
        elif isinstance(event, DeviceEvent):
            fields = _delta_fields(event.body.changes or {})
        else:
            fields = iter(())
        taken = False
        for path, index, name, value in fields:
            if current.version(path) < seq:
                _set(current, index, name, value)
                current.field_seq[path] = seq
                taken = True
        if current.version(_STATUS) < seq:
            current.reported_status = "offline" if isinstance(event, OfflineEvent) else "online"
            current.field_seq[_STATUS] = seq
            taken = True
        if not taken:
            return _OUTDATED
        current.dirty = True
        return _APPLIED

    async def _apply_discovered(
        self,
        conn: AsyncConnection,
        events: Sequence[AnyEvent],
        fresh: list[int],
    ) -> None:
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for i in fresh:
            event = events[i]
            if not isinstance(event, DiscoveredEvent):
                continue
            body = event.body
            identity = body.device_id or (
                f"{body.address}:{body.port}" if body.port is not None else body.address
            )
            key = (event.agent, identity[:200])
            previous = latest.get(key)
            if previous is not None and previous["last_seen_ms"] > event.ts:
                continue
            latest[key] = {
                "site": event.site, "agent": event.agent, "identity": key[1], "source": body.source,
                "address": body.address, "port": body.port, "vendor": body.vendor, "family": body.family,
                "model": body.model, "device_id": body.device_id, "name": body.name,
                "supported": body.supported, "first_seen_ms": event.ts, "last_seen_ms": event.ts,
            }  # fmt: skip
        if not latest:
            return
        stmt = self._statement(
            conn,
            "discovered",
            lambda ins: ins.on_conflict_do_update(
                index_elements=[discovered.c.agent, discovered.c.identity],
                set_={
                    c.name: ins.excluded[c.name]
                    for c in discovered.c
                    if c.name not in ("id", "agent", "identity", "first_seen_ms")
                },
                # A late, older answer does not overwrite a newer one.
                where=discovered.c.last_seen_ms <= ins.excluded.last_seen_ms,
            ),
            discovered,
        )
        await conn.execute(stmt, [latest[k] for k in sorted(latest)])

    async def prune_applied(self, conn: AsyncConnection, older_than_ms: int) -> int:
        """Forget dedup records applied before ``older_than_ms``; returns how many went.

        Only safe past the time any copy of an event can still arrive (stream retention, agent
        outbox age): older-than-state checks on devices still refuse a late one, but hello and
        heartbeat events would be counted again.
        """
        result = await conn.execute(delete(applied_events).where(applied_events.c.applied_ms < older_than_ms))
        return int(result.rowcount or 0)

    async def mark_unreported(self, conn: AsyncConnection, now_ms: int, grace_ms: int) -> list[DeviceRef]:
        """Set offline the devices an agent has not reported since it last started; returns them.

        A restarted agent reports every device it still watches at once (a snapshot, or
        ``offline`` when it cannot reach one). A device it has said nothing of ``grace_ms`` after
        its newest hello was applied (its last event older than that hello) is no longer watched,
        removed from the agent's configuration or no longer discovered: shown online, its last
        battery would be a lie. Its next event brings it back as usual. Looked for during
        :data:`UNREPORTED_WINDOW_MS` after the agent's start was applied (a periodic job calls this
        every few seconds; a day covers a collector that was down meanwhile).
        """
        # Agents whose grace ended within the last day: only their devices are read (by the
        # (agent, device_key) index), not the whole fleet's every few seconds.
        recent = select(agents.c.agent).where(
            agents.c.started_seen_ms <= now_ms - grace_ms,
            agents.c.started_seen_ms > now_ms - grace_ms - UNREPORTED_WINDOW_MS,
        )
        started = select(agents.c.started_ms).where(agents.c.agent == devices.c.agent).scalar_subquery()
        rows = (
            await conn.execute(
                update(devices)
                .where(
                    devices.c.agent.in_(recent),
                    devices.c.reported_status == "online",
                    devices.c.last_ts < started,
                )
                # A new revision: every collector's copy of the device is read again.
                .values(
                    status="offline",
                    reported_status="offline",
                    revision=devices.c.revision + 1,
                    updated_ms=now_ms,
                )
                .returning(devices.c.site, devices.c.agent, devices.c.device_key)
            )
        ).all()
        rows = sorted(rows, key=lambda r: (r.agent, r.device_key))
        found = [DeviceRef(r.site, r.agent, r.device_key) for r in rows]
        if found:
            log.warning(
                "devices not reported since their agent restarted are offline",
                extra={"devices": ",".join(f"{d.agent}/{d.device_key}" for d in found)[:2000]},
            )
        return found

    async def mark_stale_agents(self, conn: AsyncConnection, now_ms: int) -> list[str]:
        """Mark agents silent for :data:`STALE_AFTER_INTERVALS` heartbeat intervals, and their devices, stale.

        Returns the agents that became stale now. A stale agent's devices show ``stale`` (the data
        is old), not ``offline``; any event from the agent restores what it last reported.
        """
        return [agent for _site, agent in (await self.mark_stale(conn, now_ms)).agents]

    async def mark_stale(self, conn: AsyncConnection, now_ms: int) -> StaleChanges:
        """Like :meth:`mark_stale_agents`, also returning the sites and the devices that went stale."""
        silent = (
            agents.c.last_seen_ms + agents.c.heartbeat_interval_s * (STALE_AFTER_INTERVALS * 1000) < now_ms
        )
        rows = (
            await conn.execute(
                update(agents)
                .where(agents.c.status == "online", silent)
                .values(status="stale")
                .returning(agents.c.site, agents.c.agent)
            )
        ).all()
        became = sorted((row.site, row.agent) for row in rows)
        if not became:
            return StaleChanges([], [])
        names = [agent for _site, agent in became]
        stale_devices = await conn.execute(
            update(devices)
            .where(devices.c.agent.in_(names))
            .values(status="stale")
            .returning(devices.c.site, devices.c.agent, devices.c.device_key)
        )
        log.warning("agents went stale", extra={"agents": ",".join(names)})
        return StaleChanges(became, [DeviceRef(r.site, r.agent, r.device_key) for r in stale_devices.all()])
