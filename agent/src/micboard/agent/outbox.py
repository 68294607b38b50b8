"""The agent's on-disk outbox: JetStream events not yet acked, in SQLite (WAL) in the state directory.

Guarantees, each as a bound, a policy and a counter:

- **Bytes.** Bound: the outbox holds at most ``max_bytes`` (default 256 MiB) of events, counted
  as payload + subject + Msg-Id + device key; the file on disk is larger by SQLite's page and
  index overhead (typically < 1.5x) plus a WAL capped at 16 MiB after each checkpoint. Policy
  when a write would pass the bound, dropping oldest first within each step:
  1. snapshots *superseded* by a newer snapshot of the same device;
  2. other superseded events: deltas and ``offline`` events older than a newer snapshot of the
     same device, and agent-level events (``hello``, ``heartbeat``, ``discovered``);
  3. as a last resort, events of a device's newest state (its newest snapshot and what
     followed it) that are not the device's single newest state event.
  A device's newest state event is never dropped. Step 3 only runs when the bound is smaller
  than the devices' newest state (a misconfiguration, logged); the outbox may then pass
  ``max_bytes`` by at most one event per device. Counter: ``dropped_full``.
- **Age.** Bound: events older than ``max_age_s`` (default 7 days) are expired, except a device's
  newest state event. Counter: ``dropped_age``.
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

Ordering: rows have increasing ids in the order they were written; draining reads oldest first,
per lane (a device, or the agent itself) or overall.

Threading: an :class:`Outbox` is synchronous and must be used by one thread at a time. The
agent's sender calls it from one dedicated thread so that SQLite never blocks the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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

# An event is *superseded* when a newer snapshot of the same device is in the outbox: the
# collector ends in the same state without it. The drop steps, in order (see the module doc):
_DROP_STEPS = (
    # 1. superseded snapshots
    """SELECT o.id, o.size FROM events o WHERE o.is_snapshot = 1 AND o.device_key IS NOT NULL
       AND EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key AND n.is_snapshot = 1
                   AND n.id > o.id)
       ORDER BY o.id LIMIT ?""",
    # 2. superseded deltas and offline events, agent-level events
    """SELECT o.id, o.size FROM events o WHERE o.is_snapshot = 0 AND (o.device_key IS NULL
       OR EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key AND n.is_snapshot = 1
                  AND n.id > o.id))
       ORDER BY o.id LIMIT ?""",
    # 3. anything but the newest event of each device
    """SELECT o.id, o.size FROM events o WHERE o.device_key IS NULL
       OR EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key AND n.id > o.id)
       ORDER BY o.id LIMIT ?""",
)
_EXPIRED = """SELECT o.id, o.size FROM events o WHERE o.created_ms < ? AND (o.device_key IS NULL
       OR EXISTS (SELECT 1 FROM events n WHERE n.device_key = o.device_key AND n.id > o.id))
       ORDER BY o.id LIMIT ?"""
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

    @property
    def dropped(self) -> int:
        """Every event the outbox dropped, for any reason."""
        return self.dropped_full + self.dropped_age


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
        self._corrupt_recoveries = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._warned_over_bound = False

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
        except sqlite3.OperationalError as exc:
            self._close_quietly()
            if not _looks_corrupt(exc):
                raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
            self._recover(exc)
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
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

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
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
            if source.exists():
                try:
                    source.replace(source.with_name(self.path.name + suffix + extension))
                except OSError as move_error:
                    raise OutboxError(f"cannot move the corrupt outbox aside: {move_error}") from None
        self._prune_corrupt_copies()
        try:
            self._connect()
        except sqlite3.DatabaseError as again:
            self._close_quietly()
            raise OutboxError(f"cannot create a fresh outbox at {self.path}: {again}") from None

    def _prune_corrupt_copies(self) -> None:
        # Repeated corruption (a failing SD card) must not fill the disk with copies.
        copies = sorted(self.path.parent.glob(self.path.name + ".corrupt-*"))
        stamps = sorted({p.name.split(".corrupt-", 1)[1].split("-", 1)[0] for p in copies})
        for stale in stamps[:-_KEEP_CORRUPT_COPIES]:
            for copy in self.path.parent.glob(f"{self.path.name}.corrupt-{stale}*"):
                copy.unlink(missing_ok=True)

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
        """In one transaction: remove ``deletes``, store ``puts``, enforce the bounds.

        A record whose ``id`` is 0 gets the next free id. Returns the ids dropped by the bounds.
        """
        delete_ids = list(deletes)
        if not puts and not delete_ids:
            return []
        try:
            return self._write(puts, delete_ids)
        except sqlite3.OperationalError as exc:
            self._rollback()
            if not _looks_corrupt(exc):
                raise OutboxError(f"outbox write failed: {exc}") from None
            self._close_quietly()
            self._recover(exc)
        except sqlite3.IntegrityError as exc:
            # A record refused by a constraint (an id stored already) says nothing about the
            # file: moving a healthy outbox aside would lose everything in it.
            self._rollback()
            raise OutboxError(f"outbox write refused: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._rollback()
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
        dropped = self._make_room() if self._bytes > self.max_bytes else []
        db.execute("COMMIT")
        self._dirty = True
        self._refresh_oldest()
        return dropped

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

    def _make_room(self) -> list[int]:
        db = self._conn
        dropped: list[int] = []
        for step, query in enumerate(_DROP_STEPS, start=1):
            while self._bytes > self.max_bytes:
                rows = db.execute(query, (_DROP_BATCH,)).fetchall()
                if not rows:
                    break
                victims: list[int] = []
                excess = self._bytes - self.max_bytes
                for row_id, size in rows:
                    victims.append(int(row_id))
                    excess -= int(size)
                    if excess <= 0:
                        break
                self._delete_rows(victims)
                dropped += victims
                if step == 3 and not self._warned_over_bound:
                    self._warned_over_bound = True
                    log.error(
                        "outbox bound is smaller than the devices' newest state: dropping parts of it",
                        extra={"max_bytes": self.max_bytes, "bytes": self._bytes},
                    )
        if self._bytes > self.max_bytes and not self._warned_over_bound:
            self._warned_over_bound = True
            log.error(
                "outbox holds only the newest state of each device and is still over its bound",
                extra={"max_bytes": self.max_bytes, "bytes": self._bytes},
            )
        self._dropped_full += len(dropped)
        if dropped:
            log.warning(
                "outbox full: dropped oldest events",
                extra={"dropped": len(dropped), "bytes": self._bytes, "max_bytes": self.max_bytes},
            )
        return dropped

    def expire(self, now_ms: int | None = None) -> list[int]:
        """Drop events older than ``max_age_s`` (never a device's newest state event); returns their ids."""
        cutoff = (self._clock_ms() if now_ms is None else now_ms) - int(self.max_age_s * 1000)
        if self._oldest_ms is None or self._oldest_ms >= cutoff:
            return []
        db = self._conn
        expired: list[int] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            while rows := db.execute(_EXPIRED, (cutoff, _DROP_BATCH)).fetchall():
                ids = [int(row_id) for row_id, _size in rows]
                self._delete_rows(ids)
                expired += ids
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise OutboxError(f"outbox expiry failed: {exc}") from None
        self._dirty = self._dirty or bool(expired)
        self._dropped_age += len(expired)
        self._refresh_oldest()
        if expired:
            log.warning(
                "outbox: expired events older than the age bound",
                extra={"dropped": len(expired), "max_age_s": self.max_age_s},
            )
        return expired

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
        )


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


def _looks_corrupt(exc: sqlite3.Error) -> bool:
    # SQLite reports some damage as OperationalError; "disk full" or "locked" are not damage.
    text = str(exc).lower()
    return any(sign in text for sign in ("malformed", "not a database", "corrupt", "quick_check"))
