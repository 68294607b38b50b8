"""The agent's on-disk outbox: JetStream events not yet acked, in SQLite (WAL) in the state directory.

Guarantees, each as a bound, a policy and a counter:

- **Replayable.** What the outbox keeps of a device can always be replayed onto the collector's
  state: a delta only says what changed since the device's previous event, so it is never kept
  without the events it builds on. A device's events are therefore dropped (by either bound) a
  *segment* at a time: a snapshot with every event of the device after it up to its next
  snapshot (or, before the device's first stored snapshot, the events from its first stored
  event on, which build on what the collector has already acked). After any drop, what remains
  of a device starts with a snapshot (or an ``offline`` event, which needs no base).
  A device's *newest state* is its newest stored snapshot and every event after it (all its
  stored events when none of its snapshots is stored).
- **Bytes.** Bound: the outbox holds at most ``max_bytes`` (default 256 MiB) of events, counted
  as payload + subject + Msg-Id + device key; the file on disk is larger by SQLite's page and
  index overhead (typically < 1.5x) plus a WAL capped at 16 MiB after each checkpoint. Policy
  when a write would pass the bound:
  1. the oldest superseded events first: agent-level events (``hello``, ``heartbeat``,
     ``discovered``) one by one, and a device's events older than its newest snapshot a whole
     segment at a time, oldest segment first (a snapshot goes with the deltas that build on it);
  2. as a last resort, only when nothing but the devices' newest state is left (a bound
     smaller than that state: a misconfiguration, logged at ERROR once): deltas of the newest
     state, newest first. What remains of each device is an earlier, true state of it (its
     newest snapshot and the deltas before the dropped ones); its newest readings are lost. The
     device's next deltas build on the dropped ones, so :meth:`Outbox.take_truncated` names the
     device and the caller (the sender) drops its deltas until its next snapshot. Counter:
     ``dropped_newest`` (also in ``dropped_full``).
  Snapshots and ``offline`` events of a device's newest state are never dropped: when they alone
  pass the bound, the outbox holds them anyway (logged at ERROR once). Counter:
  ``dropped_full``. Every write that drops logs one WARNING with what it dropped.
- **Age.** Bound: events older than ``max_age_s`` (default 7 days) are expired, except a device's
  newest state; a device's events expire a segment at a time from the expired event on (a
  younger delta goes with the expired snapshot it builds on). Counter: ``dropped_age``.
- **Durability.** WAL with ``synchronous=NORMAL``: a committed write survives a crash of the
  process (SIGKILL) because it is in the operating system's cache; it is made durable against
  power loss by a checkpoint (WAL fsync, database fsync) every ``fsync_interval_s`` (default 1 s)
  while there are new writes. Power loss or a kernel crash loses at most the events committed
  in the last fsync interval. ``fsync_interval_s=0`` selects ``synchronous=FULL``: every commit
  is fsynced.
- **Corruption.** A database file that SQLite cannot read is renamed aside
  (``outbox.sqlite3.corrupt-<epoch ms>``, the 3 newest kept), logged at ERROR and replaced by an
  empty outbox; the events in it are lost to the agent but kept on disk for inspection.
  Counter: ``corrupt_recoveries``.
- **Errors.** Every public method reports a failure of SQLite (or of the file system) as
  :class:`OutboxError`, never as a raw ``sqlite3`` exception; a failed write changes nothing.

Ordering: rows have increasing ids in the order they were written; draining reads oldest first,
per lane (a device, or the agent itself) or overall.

Cost: each drop is found through indexes (the oldest superseded rows in id order, a device's
next snapshot, a segment's rows by lane): what a drop costs grows with what it drops, not with
what the outbox holds.

Threading: an :class:`Outbox` is synchronous and must be used by one thread at a time. The
agent's sender calls it from one dedicated thread so that SQLite never blocks the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micboard.shared.errors import ErrorCode, MicboardError

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite3"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_FSYNC_INTERVAL_S = 1.0

_SCHEMA_VERSION = 1
_KEEP_CORRUPT_COPIES = 3
_WAL_LIMIT_BYTES = 16 * 1024 * 1024
_DROP_BATCH = 256
_AGENT_LANE = ""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    lane TEXT NOT NULL,
    device_key TEXT,
    kind TEXT NOT NULL,
    is_snapshot INTEGER NOT NULL,
    subject TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_lane ON events (lane, id);
CREATE INDEX IF NOT EXISTS events_device ON events (device_key, is_snapshot, id)
    WHERE device_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_snapshot ON events (is_snapshot, id);
CREATE INDEX IF NOT EXISTS events_created ON events (created_ms);
"""

# An event is *superseded* when a newer snapshot of the same device is stored: the collector
# ends in the same state without it. Agent-level events are always superseded. Candidates in id
# order (rowid scan; the EXISTS probe is one seek in events_device), read lazily: at the bound
# the first rows are the ones to drop.
_SUPERSEDED = """SELECT o.id, o.size, o.device_key FROM events o
    WHERE o.device_key IS NULL OR EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key
        AND n.is_snapshot = 1 AND n.id > o.id)
    ORDER BY o.id"""
# The segment of a superseded device event: its device's events from it up to, not including,
# the device's next snapshot (events_lane range, bounded by a seek in events_device).
_SEGMENT = """SELECT id, size, is_snapshot FROM events WHERE lane = ? AND id >= ? AND id < (
    SELECT MIN(n.id) FROM events n WHERE n.device_key = ? AND n.is_snapshot = 1 AND n.id > ?)
    ORDER BY id"""
# Last resort: deltas of the devices' newest state, newest first (never snapshots or offline).
_NEWEST_DELTAS = """SELECT o.id, o.size, o.device_key FROM events o
    WHERE o.device_key IS NOT NULL AND o.is_snapshot = 0 AND o.kind != 'offline'
    AND NOT EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key AND n.is_snapshot = 1
        AND n.id > o.id)
    ORDER BY o.id DESC"""
# Expired and superseded, in id order up to the newest expired row (found in events_created,
# named: left alone, SQLite would walk the table from its newest end to find it): the scan reads
# the old end of the table only, not all of it every 10 s.
_LAST_EXPIRED = "SELECT MAX(id) FROM events INDEXED BY events_created WHERE created_ms < ?"
_EXPIRED = """SELECT o.id, o.size, o.device_key FROM events o
    WHERE o.id <= ? AND o.created_ms < ? AND (o.device_key IS NULL OR EXISTS (SELECT 1 FROM events n
        WHERE n.device_key = o.device_key AND n.is_snapshot = 1 AND n.id > o.id))
    ORDER BY o.id"""
_COLUMNS = "id, subject, msg_id, kind, device_key, is_snapshot, created_ms, payload"


class OutboxError(MicboardError):
    """The outbox could not read or write its database (disk full, I/O error, permissions).

    Code ``outbox.failed``; ``message`` says what failed.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.OUTBOX_FAILED, message)


@dataclass(slots=True)
class OutboxRecord:
    """One encoded JetStream event as the outbox stores it; ``id`` is 0 until it is stored."""

    subject: str
    msg_id: str
    kind: str
    payload: bytes
    created_ms: int
    device_key: str | None = None
    is_snapshot: bool = False
    id: int = 0

    @property
    def lane(self) -> str:
        """The ordering lane: the device's key, or ``""`` for agent-level events."""
        return self.device_key if self.device_key is not None else _AGENT_LANE

    @property
    def size(self) -> int:
        """Bytes the record counts against the outbox's bound."""
        return len(self.payload) + len(self.subject) + len(self.msg_id) + len(self.device_key or "")


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the outbox holds and what it had to drop since it was opened."""

    depth: int
    bytes: int
    oldest_age_s: float | None
    dropped_full: int
    dropped_age: int
    corrupt_recoveries: int
    max_bytes: int
    max_age_s: float
    dropped_newest: int = 0
    """Events of a device's newest state dropped as the byte bound's last resort (in ``dropped_full``)."""

    @property
    def dropped(self) -> int:
        """Every event the outbox dropped, for any reason."""
        return self.dropped_full + self.dropped_age


@dataclass(slots=True)
class _Drops:
    """What one write (or one expiry) dropped, for the counters and its log line."""

    ids: list[int] = field(default_factory=list)
    snapshots: int = 0
    bytes: int = 0
    newest: int = 0
    devices: set[str] = field(default_factory=set)
    truncated: set[str] = field(default_factory=set)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Outbox:
    """SQLite store of events waiting for a JetStream ack, bounded by bytes and age (see module doc)."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0 or fsync_interval_s < 0:
            raise ValueError("max_bytes and max_age_s must be positive, fsync_interval_s not negative")
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.fsync_interval_s = fsync_interval_s
        self._clock_ms = clock_ms
        self._db: sqlite3.Connection | None = None
        self._depth = 0
        self._bytes = 0
        self._oldest_ms: int | None = None
        self._dropped_full = 0
        self._dropped_age = 0
        self._dropped_newest = 0
        self._truncated: set[str] = set()
        self._corrupt_recoveries = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._warned_over_bound = False
        self._warned_newest = False

    @classmethod
    def in_state_dir(
        cls,
        state_dir: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
    ) -> Outbox:
        """An outbox in ``state_dir`` (created when opened), not opened yet."""
        return cls(
            state_dir / OUTBOX_FILE,
            max_bytes=max_bytes,
            max_age_s=max_age_s,
            fsync_interval_s=fsync_interval_s,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Outbox:
        """Open (or create) the database; a corrupt file is moved aside and replaced."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create the state directory {self.path.parent}: {exc}") from None
        try:
            self._connect()
        except sqlite3.Error as exc:
            self._close_quietly()
            if not _is_corruption(exc):
                raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
            self._recover(exc)
        return self

    def close(self) -> None:
        """Checkpoint (fsync) and close; safe to call twice."""
        if self._db is None:
            return
        try:
            self.sync()
        except OutboxError:
            log.exception("outbox checkpoint failed at close", extra={"path": str(self.path)})
        self._close_quietly()

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db = db
        # auto_vacuum only takes effect before the first table exists: set it on a new file.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode is {mode})")
        db.execute("PRAGMA synchronous = " + ("FULL" if self.fsync_interval_s == 0 else "NORMAL"))
        db.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
        check = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check failed: {check}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"unknown outbox schema version {version}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        depth, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events").fetchone()
        self._depth, self._bytes = int(depth), int(size)
        self._refresh_oldest()
        self._last_sync = time.monotonic()

    def _recover(self, exc: sqlite3.Error) -> None:
        self._corrupt_recoveries += 1
        suffix = f".corrupt-{_now_ms()}"
        aside = self.path.with_name(self.path.name + suffix)
        log.error(
            "OUTBOX DATABASE IS CORRUPT: moved aside, starting with an empty outbox; "
            "the events in it will not be sent",
            extra={"path": str(self.path), "moved_to": str(aside), "error": str(exc)},
        )
        for extension in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + extension)
            try:
                source.replace(source.with_name(self.path.name + suffix + extension))
            except FileNotFoundError:
                continue
            except OSError as move_error:
                raise OutboxError(f"cannot move the corrupt outbox aside: {move_error}") from None
        self._prune_corrupt_copies()
        try:
            self._connect()
        except sqlite3.Error as again:
            self._close_quietly()
            raise OutboxError(f"cannot create a fresh outbox at {self.path}: {again}") from None

    def _prune_corrupt_copies(self) -> None:
        # Repeated corruption (a failing SD card) must not fill the disk with copies.
        try:
            copies = sorted(self.path.parent.glob(self.path.name + ".corrupt-*"))
            stamps = sorted({p.name.split(".corrupt-", 1)[1].split("-", 1)[0] for p in copies})
            for stale in stamps[:-_KEEP_CORRUPT_COPIES]:
                for copy in self.path.parent.glob(f"{self.path.name}.corrupt-{stale}*"):
                    copy.unlink(missing_ok=True)
        except OSError as exc:
            # Best effort: a copy that cannot be removed must not keep the agent from starting.
            log.warning("cannot remove old corrupt outbox copies", extra={"error": str(exc)})

    def _close_quietly(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                log.warning("closing the outbox failed", extra={"path": str(self.path)})

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError("the outbox is not open")
        return self._db

    # -- writing -----------------------------------------------------------------------------

    def put(self, record: OutboxRecord) -> list[int]:
        """Store one record; returns the ids dropped to stay within the bounds."""
        return self.write([record], ())

    def delete(self, ids: Iterable[int]) -> None:
        """Remove records that were acked (unknown ids are ignored)."""
        self.write((), ids)

    def write(self, puts: Sequence[OutboxRecord], deletes: Iterable[int]) -> list[int]:
        """In one transaction: remove ``deletes``, store ``puts``, enforce the byte bound.

        A record whose ``id`` is 0 gets the next free id. Returns the ids dropped by the bound,
        in id order. Raises :class:`OutboxError` when the write failed: then nothing of it
        happened (the caller may try the same write again).
        """
        delete_ids = list(deletes)
        if not puts and not delete_ids:
            return []
        try:
            return self._write(puts, delete_ids)
        except sqlite3.IntegrityError as exc:
            # A record refused by a constraint (an id stored already) says nothing about the
            # file: moving a healthy outbox aside would lose everything in it.
            self._rollback()
            raise OutboxError(f"outbox write refused: {exc}") from None
        except sqlite3.Error as exc:
            self._rollback()
            if not _is_corruption(exc):
                raise OutboxError(f"outbox write failed: {exc}") from None
            self._close_quietly()
            self._recover(exc)
        # The acked ids went with the corrupt file; the new records go into the fresh one.
        try:
            return self._write(puts, [])
        except sqlite3.Error as exc:
            self._rollback()
            raise OutboxError(f"outbox write failed after recovery: {exc}") from None

    def _write(self, puts: Sequence[OutboxRecord], delete_ids: list[int]) -> list[int]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        if delete_ids:
            self._delete_rows(delete_ids)
        for record in puts:
            size = record.size
            cursor = db.execute(
                "INSERT INTO events (id, lane, device_key, kind, is_snapshot, subject, msg_id, created_ms,"
                " size, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id or None, record.lane, record.device_key, record.kind,
                    int(record.is_snapshot), record.subject, record.msg_id, record.created_ms,
                    size, record.payload,
                ),
            )  # fmt: skip
            if cursor.lastrowid is not None:
                record.id = cursor.lastrowid
            self._depth += 1
            self._bytes += size
        drops = self._make_room() if self._bytes > self.max_bytes else None
        # Everything that can fail happens before COMMIT: a failed write changed nothing.
        self._refresh_oldest()
        db.execute("COMMIT")
        self._dirty = True
        if drops is None or not drops.ids:
            return []
        self._dropped_full += len(drops.ids)
        self._dropped_newest += drops.newest
        self._truncated |= drops.truncated
        log.warning(
            # The first words are what operators alert on (OPERATIONS.md): keep them.
            "outbox full: dropped oldest events"
            if not drops.newest
            else "outbox full: dropped oldest events and the newest deltas of devices",
            extra={
                "dropped": len(drops.ids),
                "snapshots": drops.snapshots,
                "newest_state": drops.newest,
                "devices": len(drops.devices),
                "freed_bytes": drops.bytes,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
            },
        )
        return sorted(drops.ids)

    def _delete_rows(self, ids: Sequence[int]) -> None:
        db = self._conn
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            count, size = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events WHERE id IN ({marks})",  # noqa: S608  # nosec B608
                chunk,
            ).fetchone()
            db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)  # noqa: S608  # nosec B608
            self._depth -= int(count)
            self._bytes -= int(size)

    def _delete_known(self, sizes: dict[int, int]) -> None:
        # Rows read in this transaction: their sizes are known, no need to sum them again.
        db = self._conn
        ids = list(sizes)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)  # noqa: S608  # nosec B608
        self._depth -= len(ids)
        self._bytes -= sum(sizes.values())

    def _make_room(self) -> _Drops:
        drops = _Drops()
        # 1. Superseded events, oldest first, a device's a whole segment at a time.
        while self._bytes > self.max_bytes:
            if not self._drop_superseded(drops, _SUPERSEDED, (), self._bytes - self.max_bytes):
                break
        # 2. Last resort: the newest deltas of the devices' newest state.
        if self._bytes > self.max_bytes:
            self._drop_newest_deltas(drops)
            if drops.newest and not self._warned_newest:
                self._warned_newest = True
                log.error(
                    "outbox bound is smaller than the devices' newest state: dropping their newest "
                    "deltas (each device keeps its newest snapshot, and its next deltas are dropped "
                    "until its next snapshot)",
                    extra={"max_bytes": self.max_bytes, "bytes": self._bytes},
                )
        if self._bytes > self.max_bytes and not self._warned_over_bound:
            self._warned_over_bound = True
            log.error(
                "outbox holds only the newest snapshots and offline events of its devices and is "
                "still over its bound",
                extra={"max_bytes": self.max_bytes, "bytes": self._bytes},
            )
        return drops

    def _drop_superseded(
        self, drops: _Drops, query: str, params: tuple[Any, ...], excess: int | None
    ) -> bool:
        """Drop superseded events from ``query`` (in id order), a device's a segment at a time.

        Stops once ``excess`` bytes are freed (``None``: after about a batch of rows). Returns
        whether anything was dropped.
        """
        db = self._conn
        victims: dict[int, int] = {}
        snapshots = 0
        cursor = db.execute(query, params)
        try:
            for row_id, size, device_key in cursor:
                if row_id in victims:
                    continue  # in the segment of an older event already
                unit: list[tuple[int, int, int]] = [(row_id, size, 0)]
                if device_key is not None:
                    # With the rest of its segment (its device's events up to its next snapshot):
                    # a delta is never kept without the events it builds on.
                    unit = db.execute(_SEGMENT, (device_key, row_id, device_key, row_id)).fetchall() or unit
                    drops.devices.add(device_key)
                for unit_id, unit_size, is_snapshot in unit:
                    victims[unit_id] = unit_size
                    snapshots += is_snapshot
                    if excess is not None:
                        excess -= unit_size
                if (excess is not None and excess <= 0) or len(victims) >= _DROP_BATCH:
                    break
        finally:
            cursor.close()
        if not victims:
            return False
        self._delete_known(victims)
        drops.ids += victims
        drops.snapshots += snapshots
        drops.bytes += sum(victims.values())
        return True

    def _drop_newest_deltas(self, drops: _Drops) -> None:
        db = self._conn
        excess = self._bytes - self.max_bytes
        victims: dict[int, int] = {}
        cursor = db.execute(_NEWEST_DELTAS)
        try:
            for row_id, size, device_key in cursor:
                victims[row_id] = size
                drops.truncated.add(device_key)
                excess -= size
                if excess <= 0:
                    break
        finally:
            cursor.close()
        if victims:
            self._delete_known(victims)
            drops.ids += victims
            drops.newest += len(victims)
            drops.bytes += sum(victims.values())
            drops.devices |= drops.truncated

    def expire(self, now_ms: int | None = None) -> list[int]:
        """Drop events older than ``max_age_s`` (never a device's newest state); returns their ids.

        A device's events expire a segment at a time (see the module doc): a younger delta goes
        with the expired snapshot it builds on.
        """
        cutoff = (self._clock_ms() if now_ms is None else now_ms) - int(self.max_age_s * 1000)
        if self._oldest_ms is None or self._oldest_ms >= cutoff:
            return []
        db = self._conn
        drops = _Drops()
        try:
            db.execute("BEGIN IMMEDIATE")
            last = db.execute(_LAST_EXPIRED, (cutoff,)).fetchone()[0]
            while last is not None and self._drop_superseded(drops, _EXPIRED, (last, cutoff), None):
                pass
            self._refresh_oldest()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise OutboxError(f"outbox expiry failed: {exc}") from None
        self._dirty = self._dirty or bool(drops.ids)
        self._dropped_age += len(drops.ids)
        if drops.ids:
            log.warning(
                "outbox: expired events older than the age bound",
                extra={
                    "dropped": len(drops.ids),
                    "snapshots": drops.snapshots,
                    "devices": len(drops.devices),
                    "freed_bytes": drops.bytes,
                    "max_age_s": self.max_age_s,
                },
            )
        return sorted(drops.ids)

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("outbox rollback failed", extra={"path": str(self.path)})
        if db is not None:
            # The in-memory totals may be off after a rolled-back transaction: recount.
            try:
                depth, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events").fetchone()
                self._depth, self._bytes = int(depth), int(size)
                self._refresh_oldest()
            except sqlite3.Error:
                return

    def _refresh_oldest(self) -> None:
        row = self._conn.execute("SELECT MIN(created_ms) FROM events").fetchone()
        self._oldest_ms = None if row[0] is None else int(row[0])

    # -- durability --------------------------------------------------------------------------

    def sync(self) -> None:
        """Checkpoint the WAL into the database, fsyncing both; give free pages back when empty."""
        db = self._conn
        try:
            if self._depth == 0:
                # executescript steps the pragma to completion; execute() frees one page only.
                db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox checkpoint failed: {exc}") from None
        self._dirty = False
        self._last_sync = time.monotonic()

    def maybe_sync(self) -> bool:
        """Run :meth:`sync` if there were writes and the fsync interval has passed; returns whether it ran."""
        if not self._dirty or time.monotonic() - self._last_sync < self.fsync_interval_s:
            return False
        self.sync()
        return True

    # -- reading -----------------------------------------------------------------------------

    def oldest(self, limit: int = 100) -> list[OutboxRecord]:
        """The oldest ``limit`` records, oldest first (the drain order)."""
        rows = self._query(f"SELECT {_COLUMNS} FROM events ORDER BY id LIMIT ?", (limit,))  # noqa: S608  # nosec B608
        return [_record(row) for row in rows]

    def read_lane(self, lane: str, after_id: int = 0, limit: int = 100) -> list[OutboxRecord]:
        """Records of one lane (a device key, or ``""`` for agent-level events) after ``after_id``."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM events WHERE lane = ? AND id > ? ORDER BY id LIMIT ?",  # noqa: S608  # nosec B608
            (lane, after_id, limit),
        )
        return [_record(row) for row in rows]

    def lanes(self) -> dict[str, int]:
        """Every lane with records, and the id of its newest record."""
        rows = self._query("SELECT lane, MAX(id) FROM events GROUP BY lane", ())
        return {str(lane): int(max_id) for lane, max_id in rows}

    def max_id(self) -> int:
        """The highest id stored, 0 when empty."""
        return int(self._query("SELECT COALESCE(MAX(id), 0) FROM events", ())[0][0])

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox read failed: {exc}") from None

    def stats(self) -> OutboxStats:
        """Depth, bytes, age of the oldest event and the drop counters (cheap: no query)."""
        oldest = self._oldest_ms
        return OutboxStats(
            depth=self._depth,
            bytes=self._bytes,
            oldest_age_s=None if oldest is None else max(0.0, (self._clock_ms() - oldest) / 1000),
            dropped_full=self._dropped_full,
            dropped_age=self._dropped_age,
            corrupt_recoveries=self._corrupt_recoveries,
            max_bytes=self.max_bytes,
            max_age_s=self.max_age_s,
            dropped_newest=self._dropped_newest,
        )

    def take_truncated(self) -> set[str]:
        """Devices whose newest state lost deltas to the byte bound since the last call (then cleared).

        Their next deltas build on what was dropped: the caller must not store or send them
        before the device's next snapshot (see the module doc).
        """
        truncated, self._truncated = self._truncated, set()
        return truncated


def _record(row: tuple[Any, ...]) -> OutboxRecord:
    row_id, subject, message_id, kind, device_key, is_snapshot, created_ms, payload = row
    return OutboxRecord(
        id=int(row_id),
        subject=str(subject),
        msg_id=str(message_id),
        kind=str(kind),
        device_key=None if device_key is None else str(device_key),
        is_snapshot=bool(is_snapshot),
        created_ms=int(created_ms),
        payload=bytes(payload),
    )


def _is_corruption(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged (then it is moved aside), not that an operation failed."""
    if _looks_corrupt(exc):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Raised by our own checks at open (schema version): about the file.
        return type(exc) is sqlite3.DatabaseError
    # A full disk, a lock, a refused statement or a bad parameter say nothing about the file.
    return (code & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _looks_corrupt(exc: sqlite3.Error) -> bool:
    # SQLite reports some damage as OperationalError; "disk full" or "locked" are not damage.
    text = str(exc).lower()
    return any(sign in text for sign in ("malformed", "not a database", "corrupt", "quick_check"))
