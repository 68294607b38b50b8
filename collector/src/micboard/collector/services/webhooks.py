"""Webhook delivery: signed JSON POSTs with bounded retries, logged, never in the ingest path.

Guarantee: :meth:`WebhookDispatcher.submit` never blocks. Jobs wait in a bounded queue
(``queue_size``); when it is full the new job is dropped and counted (``stats.dropped``).
Each delivery is tried at most ``max_attempts`` times with exponential backoff
(``backoff_initial_s`` doubling up to ``backoff_max_s``: by default 8 attempts over about two
minutes), while the webhook exists and is enabled; every attempt writes a
``webhook_deliveries`` row. At most ``max_concurrent`` deliveries run at once. Delivery is held
in memory only: at a shutdown :meth:`WebhookDispatcher.close` gives what is queued a grace
period, and what is left after it is counted and logged, not kept.

Receivers verify ``X-Micboard-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body under
the webhook's secret. The body carries ``delivery_id`` (stable across retries, to deduplicate)
and ``created_ms`` (to refuse replays of old bodies); ``X-Micboard-Timestamp`` is the send time
of the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.errors import InvalidWebhookError, WebhookNotFoundError
from micboard.collector.runtime import cancel_all
from micboard.collector.store.schema_alerts import webhook_deliveries, webhooks
from micboard.shared.redact import register_secret

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Micboard-Signature"
TIMESTAMP_HEADER = "X-Micboard-Timestamp"
EVENT_HEADER = "X-Micboard-Event"
DELIVERY_HEADER = "X-Micboard-Delivery"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the valid signature of ``body`` (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), signature)


@dataclass(frozen=True, slots=True)
class Webhook:
    """A configured webhook, without its secret."""

    id: int
    url: str
    events: tuple[str, ...]
    enabled: bool
    created_ms: int

    def accepts(self, event: str) -> bool:
        """Whether this webhook wants ``event`` (no filter means every event)."""
        return not self.events or event in self.events


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One logged attempt of a delivery."""

    webhook_id: int
    delivery_id: str
    event: str
    alert_id: int | None
    attempt: int
    status_code: int | None
    error: str | None
    ok: bool
    duration_ms: int
    created_ms: int


@dataclass(slots=True)
class WebhookStats:
    """Counters of the dispatcher, exported as metrics."""

    submitted: int = 0
    dropped: int = 0
    attempts: int = 0
    delivered: int = 0
    failed: int = 0
    abandoned: int = 0  # queued or retrying when the dispatcher closed
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Job:
    event: str
    payload: Mapping[str, Any]
    alert_id: int | None
    created_ms: int


class WebhookDispatcher:
    """Owns the webhook queue, its worker task and the delivery tasks; ``close`` cancels them all."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        queue_size: int = 1000,
        max_attempts: int = 8,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 10.0,
        max_concurrent: int = 8,
    ) -> None:
        if queue_size < 1 or max_attempts < 1 or max_concurrent < 1:
            raise ValueError("queue_size, max_attempts and max_concurrent must be at least 1")
        self.engine = engine
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.stats = WebhookStats()
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._session: aiohttp.ClientSession | None = None
        self._worker: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    # -- configuration ------------------------------------------------------------------------

    async def add_webhook(
        self, url: str, secret: str, events: Sequence[str] = (), *, enabled: bool = True
    ) -> Webhook:
        """Register a webhook; ``events`` empty means every event."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidWebhookError("the webhook URL must be an absolute http:// or https:// URL")
        if len(secret) < 16:
            raise InvalidWebhookError("the webhook secret must be at least 16 characters")
        if any(not isinstance(e, str) or not e for e in events):
            raise InvalidWebhookError("event names must be non-empty strings")
        now = _now_ms()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(webhooks).values(
                    url=url, secret=secret, events=list(events), enabled=enabled, created_ms=now
                )
            )
            webhook_id = int(result.inserted_primary_key[0]) if result.inserted_primary_key else 0
        return Webhook(webhook_id, url, tuple(events), enabled, now)

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook, without secrets."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(webhooks).order_by(webhooks.c.id))).mappings().all()
        return [self._webhook(row) for row in rows]

    async def set_enabled(self, webhook_id: int, enabled: bool) -> Webhook:
        """Enable or disable a webhook."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(webhooks).where(webhooks.c.id == webhook_id).values(enabled=enabled)
            )
            if result.rowcount == 0:
                raise WebhookNotFoundError(webhook_id)
            row = (await conn.execute(select(webhooks).where(webhooks.c.id == webhook_id))).mappings().one()
        return self._webhook(row)

    async def remove_webhook(self, webhook_id: int) -> None:
        """Delete a webhook and its delivery log."""
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
            )
            result = await conn.execute(delete(webhooks).where(webhooks.c.id == webhook_id))
            if result.rowcount == 0:
                raise WebhookNotFoundError(webhook_id)

    async def deliveries(self, webhook_id: int | None = None, *, limit: int = 100) -> list[DeliveryAttempt]:
        """The delivery log, newest first."""
        query = select(webhook_deliveries).order_by(webhook_deliveries.c.id.desc()).limit(limit)
        if webhook_id is not None:
            query = query.where(webhook_deliveries.c.webhook_id == webhook_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [
            DeliveryAttempt(
                webhook_id=row["webhook_id"],
                delivery_id=row["delivery_id"],
                event=row["event"],
                alert_id=row["alert_id"],
                attempt=row["attempt"],
                status_code=row["status_code"],
                error=row["error"],
                ok=bool(row["ok"]),
                duration_ms=row["duration_ms"],
                created_ms=row["created_ms"],
            )
            for row in rows
        ]

    @staticmethod
    def _webhook(row: Mapping[Any, Any]) -> Webhook:
        return Webhook(
            row["id"], row["url"], tuple(row["events"] or ()), bool(row["enabled"]), row["created_ms"]
        )

    # -- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker task (idempotent)."""
        if self._worker is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._worker = asyncio.create_task(self._run(), name="webhook-worker")

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop: give queued and running deliveries up to ``grace_s``, cancel the rest, close the session.

        The grace lets the alerts of the last batches before a shutdown go out; what is still
        queued or retrying after it is cancelled, counted (``stats.abandoned``) and logged.
        """
        if grace_s > 0 and self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await self.drain(grace_s)
        left = self._queue.qsize() + len(self._deliveries)
        if left:
            self.stats.abandoned += left
            log.warning("webhook deliveries abandoned at shutdown", extra={"count": left})
        await cancel_all(t for t in (self._worker, *self._deliveries) if t is not None)
        self._worker = None
        self._deliveries.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def submit(self, event: str, payload: Mapping[str, Any], *, alert_id: int | None = None) -> bool:
        """Queue ``event`` for every webhook that wants it; never blocks, ``False`` when dropped."""
        try:
            self._queue.put_nowait(_Job(event, payload, alert_id, _now_ms()))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning(
                "webhook queue full, event dropped", extra={"event": event, "dropped": self.stats.dropped}
            )
            return False
        self.stats.submitted += 1
        return True

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until the queue is empty and no delivery is in flight (for shutdown and tests)."""
        async with asyncio.timeout(timeout_s):
            await self._queue.join()
            while self._deliveries:
                await asyncio.wait(set(self._deliveries))

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                async with self.engine.connect() as conn:
                    rows = (
                        (await conn.execute(select(webhooks).where(webhooks.c.enabled.is_(True))))
                        .mappings()
                        .all()
                    )
                for row in rows:
                    # Known from here on to the log filter: an HTTP library quoting a header or
                    # a signature input must not put the webhook's secret in the journal.
                    register_secret(row["secret"])
                    if not self._webhook(row).accepts(job.event):
                        continue
                    # Waiting for a slot here turns slow endpoints into queue growth, then counted drops.
                    await self._slots.acquire()
                    task = asyncio.create_task(
                        self._deliver(row["id"], row["url"], row["secret"], job), name="webhook-delivery"
                    )
                    self._deliveries.add(task)
                    task.add_done_callback(self._delivery_done)
            except Exception as exc:  # a broken job (store down) must not stop the worker
                log.exception("webhook job failed", extra={"event": job.event, "error": str(exc)})
            finally:
                self._queue.task_done()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery crashed", extra={"error": repr(task.exception())})

    async def _deliver(self, webhook_id: int, url: str, secret: str, job: _Job) -> None:
        delivery_id = uuid.uuid4().hex
        body = json.dumps(
            {
                "event": job.event,
                "delivery_id": delivery_id,
                "created_ms": job.created_ms,
                "data": job.payload,
            },
            separators=(",", ":"),
            sort_keys=True,
            default=str,
        ).encode()
        signature = sign(secret, body)
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            status: int | None = None
            error: str | None = None
            retry = False
            try:
                status = await self._post(url, body, job.event, delivery_id, signature)
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
                    # 408, 429 and 5xx are the endpoint's temporary trouble; other 4xx will not change.
                    retry = status in (408, 429) or status >= 500
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                retry = True
            ok = error is None
            duration_ms = int((time.monotonic() - started) * 1000)
            try:
                await self._log_attempt(webhook_id, delivery_id, job, attempt, status, error, ok, duration_ms)
            except (SQLAlchemyError, OSError) as exc:
                # The log is a record of the delivery, not the delivery: a store that cannot
                # write it (busy, or the webhook just removed) must not stop the retries.
                log.warning(
                    "webhook delivery not logged",
                    extra={"webhook_id": webhook_id, "delivery_id": delivery_id, "error": str(exc)},
                )
            self.stats.attempts += 1
            key = str(status) if status is not None else "error"
            self.stats.by_status[key] = self.stats.by_status.get(key, 0) + 1
            if ok:
                self.stats.delivered += 1
                return
            if not retry or attempt == self.max_attempts:
                break
            await asyncio.sleep(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1)))
            if not await self._still_wanted(webhook_id):
                log.info(
                    "webhook removed or disabled, retries stopped",
                    extra={"webhook_id": webhook_id, "delivery_id": delivery_id, "event": job.event},
                )
                return
        self.stats.failed += 1
        log.warning(
            "webhook delivery failed",
            extra={"webhook_id": webhook_id, "delivery_id": delivery_id, "event": job.event, "error": error},
        )

    async def _still_wanted(self, webhook_id: int) -> bool:
        """Whether webhook ``webhook_id`` still exists and is enabled (checked before each retry)."""
        try:
            async with self.engine.connect() as conn:
                enabled = (
                    await conn.execute(select(webhooks.c.enabled).where(webhooks.c.id == webhook_id))
                ).scalar_one_or_none()
        except (SQLAlchemyError, OSError):
            return True  # the store is unsure, the endpoint may not be: keep trying
        return bool(enabled)

    async def _post(self, url: str, body: bytes, event: str, delivery_id: str, signature: str) -> int:
        if self._session is None:
            raise aiohttp.ClientConnectionError("dispatcher is closed")
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery_id,
            TIMESTAMP_HEADER: str(_now_ms()),
            SIGNATURE_HEADER: signature,
        }
        async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            await response.read()
            return response.status

    async def _log_attempt(
        self,
        webhook_id: int,
        delivery_id: str,
        job: _Job,
        attempt: int,
        status: int | None,
        error: str | None,
        ok: bool,
        duration_ms: int,
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(webhook_deliveries).values(
                    webhook_id=webhook_id,
                    delivery_id=delivery_id,
                    event=job.event,
                    alert_id=job.alert_id,
                    attempt=attempt,
                    status_code=status,
                    error=error,
                    ok=ok,
                    duration_ms=duration_ms,
                    created_ms=_now_ms(),
                )
            )
