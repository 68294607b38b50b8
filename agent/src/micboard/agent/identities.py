"""The device keys the agent published under, remembered across restarts by each device's id.

A device's key comes from what discovery saw first: its id when the announcement carried one
(Shure over SLP), else its address (a Sennheiser DNS-SD announcement, a static entry). Within one
run the supervisor links the id the driver reads to that key; this file keeps the link for the
next run, so that a receiver that got another address from DHCP while the agent was down, or a
Shure receiver first seen over mDNS on one boot and over SLP on the next, is published under the
key the fleet knows (one tile, one history), not a new one.

The memory is a small JSON file in the state directory, ``device-keys.json``::

    {"version": 1, "keys": {"id:sennheiser:1234567890": {"key": "ewdx-192.168.1.77-45", "seen": 1718000000}}}

- Only stable identities (``id:<vendor>:<id>``) are kept; a device may have several (a Shure
  receiver's SLP component id and its device id), all pointing at its one key.
- Written atomically (a temporary file, fsynced, renamed over the old one) when an identity is
  learned or its key changes, and when an entry's ``seen`` is a day old, so it is not rewritten
  at every announcement.
- Bounded: entries unseen for ``max_age_s`` (90 days) are forgotten and at most ``max_entries``
  (4096), the most recently seen, are kept.
- A missing file is an empty memory. A file that cannot be read or parsed is logged (warning),
  moved aside to ``device-keys.json.corrupt`` (one copy, replaced) and the memory starts empty;
  entries of the wrong shape are skipped. A file that cannot be written is logged (warning) and
  the memory goes on in memory only. Nothing here raises.
- Times are wall-clock seconds, never earlier than the newest ``seen`` already known: a Pi that
  boots without a real-time clock (and starts in the past until NTP answers) does not stamp
  entries so old that the next start forgets them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEVICE_KEYS_FILE = "device-keys.json"
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_AGE_S = 90 * 24 * 3600.0
# An entry whose ``seen`` is older than this is rewritten when its device is seen again.
DEFAULT_REFRESH_S = 24 * 3600.0
_VERSION = 1
_MAX_KEY = 128
_MAX_IDENTITY = 512
STABLE_PREFIX = "id:"


@dataclass(slots=True)
class _Entry:
    key: str
    seen: float


class DeviceKeyMemory:
    """Stable identity -> the device key it was published under, kept in ``path`` (``None``: not kept)."""

    def __init__(
        self,
        path: Path | None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries <= 0 or max_age_s <= 0 or refresh_s < 0:
            raise ValueError("max_entries and max_age_s must be positive, refresh_s not negative")
        self.path = path
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.refresh_s = refresh_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._by_key: dict[str, set[str]] = {}
        self._newest = 0.0
        self.writes = 0
        self.write_errors = 0
        if path is not None:
            self._load(path)

    @classmethod
    def in_state_dir(cls, state_dir: Path | None) -> DeviceKeyMemory:
        """The memory in ``state_dir`` (read now), or one that keeps nothing when it is ``None``."""
        return cls(None if state_dir is None else state_dir / DEVICE_KEYS_FILE)

    # -- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def key_for(self, identity: str) -> str | None:
        """The key ``identity`` was last published under, or ``None``."""
        entry = self._entries.get(identity)
        return None if entry is None else entry.key

    def identities_of(self, key: str) -> frozenset[str]:
        """The identities remembered under ``key`` (empty when ``key`` is nobody's)."""
        return frozenset(self._by_key.get(key, ()))

    def identities(self, prefix: str = "") -> list[str]:
        """Every remembered identity that starts with ``prefix``."""
        return [identity for identity in self._entries if identity.startswith(prefix)]

    # -- learning -----------------------------------------------------------------------

    def remember(self, identity: str, key: str) -> None:
        """``identity`` is published under ``key``: kept (and saved) when new, changed or a day old."""
        if not identity.startswith(STABLE_PREFIX) or not key or len(identity) > _MAX_IDENTITY:
            return
        now = self._now()
        entry = self._entries.get(identity)
        if entry is not None and entry.key == key and now - entry.seen < self.refresh_s:
            return
        self._put(identity, _Entry(key[:_MAX_KEY], now))
        self._prune(now)
        self._save()

    def _now(self) -> float:
        now = max(self._clock(), self._newest)
        self._newest = now
        return now

    def _put(self, identity: str, entry: _Entry) -> None:
        self._drop(identity)
        self._entries[identity] = entry
        self._by_key.setdefault(entry.key, set()).add(identity)
        self._newest = max(self._newest, entry.seen)

    def _drop(self, identity: str) -> None:
        old = self._entries.pop(identity, None)
        if old is None:
            return
        owners = self._by_key.get(old.key)
        if owners is not None:
            owners.discard(identity)
            if not owners:
                del self._by_key[old.key]

    def _prune(self, now: float) -> None:
        stale = [i for i, e in self._entries.items() if now - e.seen > self.max_age_s]
        excess = len(self._entries) - len(stale) - self.max_entries
        if excess > 0:
            fresh = sorted((e.seen, i) for i, e in self._entries.items() if now - e.seen <= self.max_age_s)
            stale.extend(i for _, i in fresh[:excess])
        for identity in stale:
            self._drop(identity)

    # -- the file -----------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("no remembered device keys yet", extra={"path": str(path)})
            return
        except (OSError, UnicodeDecodeError) as exc:
            self._unreadable(path, exc)
            return
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._unreadable(path, exc)
            return
        keys = data.get("keys") if isinstance(data, dict) and data.get("version") == _VERSION else None
        if not isinstance(keys, dict):
            self._unreadable(path, ValueError("not a device key file of version 1"))
            return
        skipped = 0
        for identity, raw in keys.items():
            entry = _entry(identity, raw)
            if entry is None:
                skipped += 1
            else:
                self._put(identity, entry)
        if skipped:
            log.warning(
                "remembered device keys: malformed entries skipped",
                extra={"path": str(path), "skipped": skipped},
            )
        self._prune(self._now())
        log.info("remembered device keys read", extra={"path": str(path), "entries": len(self._entries)})

    def _unreadable(self, path: Path, exc: Exception) -> None:
        aside = path.with_name(path.name + ".corrupt")
        try:
            path.replace(aside)
        except OSError:
            aside = path
        log.warning(
            "remembered device keys unreadable, starting without them: a receiver that moved "
            "while the agent was down may show under a new key",
            extra={"path": str(path), "moved_to": str(aside), "error": f"{type(exc).__name__}: {exc}"},
        )

    def _save(self) -> None:
        path = self.path
        if path is None:
            return
        body = {
            "version": _VERSION,
            "keys": {
                identity: {"key": entry.key, "seen": round(entry.seen)}
                for identity, entry in sorted(self._entries.items())
            },
        }
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(body, out, separators=(",", ":"))
                out.flush()
                os.fsync(out.fileno())
            Path(tmp).replace(path)
            tmp = None
            _fsync_dir(path.parent)
            self.writes += 1
        except OSError as exc:
            self.write_errors += 1
            log.warning(
                "remembered device keys not saved: kept in memory only",
                extra={"path": str(path), "error": f"{type(exc).__name__}: {exc}"},
            )
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()


def _entry(identity: object, raw: object) -> _Entry | None:
    if not isinstance(identity, str) or not identity.startswith(STABLE_PREFIX):
        return None
    if len(identity) > _MAX_IDENTITY or not isinstance(raw, dict):
        return None
    key, seen = raw.get("key"), raw.get("seen")
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
        return None
    if isinstance(seen, bool) or not isinstance(seen, int | float) or not math.isfinite(seen):
        return None
    return _Entry(key, float(seen))


def _fsync_dir(directory: Path) -> None:
    # The rename is durable once the directory is; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
