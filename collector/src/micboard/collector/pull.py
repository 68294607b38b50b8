"""A lean fetcher for a JetStream pull consumer: one pull request per batch, deliveries by callback.

nats-py's ``PullSubscription.fetch`` waits for each message of a batch with its own timer task,
which costs more than everything else a bare consumer does (``bench/collector.py`` measures both).
This fetcher sends the same pull requests (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``) and
collects the deliveries on an inbox subscription in one callback.

- A fetch first asks for up to ``batch`` messages without waiting (``no_wait``); only when none are
  available does it wait, up to the timeout, for the next one. So a backlog is fetched in full
  batches and a quiet stream still hands over each event as it arrives.
  :meth:`PullFetcher.fetch_available` is the first half alone: what is there now, if anything.
- Deliveries of an earlier request that arrive late (a long poll answered after its fetch timed
  out) are kept and returned by the next fetch: everything delivered is handed over exactly
  once. :meth:`PullFetcher.take_buffered` returns what is held, to be nak'ed at stop.
- Status answers (404 no messages, 408 request expired, 409 and others) end a fetch early;
  unexpected ones are counted in :attr:`PullFetcher.unexpected_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_JS_ACK_PREFIX = "$JS.ACK."
_EXPECTED_STATUS = frozenset({"404", "408"})
# The server expires a long poll a little before the fetch gives up, so that its answer (a
# message or 408) usually arrives while the fetch still waits.
_EXPIRES_MARGIN_S = 0.05


class PullFetcher:
    """Fetches batches of messages from the durable pull consumer ``durable`` of ``stream``."""

    def __init__(
        self, nc: Client, stream: str, durable: str, *, on_status: Callable[[str], None] | None = None
    ) -> None:
        self.nc = nc
        # Told of every unexpected status (the ingest counts them as fetch errors).
        self.on_status = on_status
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.unexpected_status = 0
        self._buffer: deque[Msg] = deque()
        self._ready = asyncio.Event()
        self._want = 0
        self._inbox = ""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the inbox the deliveries come to."""
        if self._sub is None:
            self._inbox = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)

    async def close(self) -> None:
        """Stop receiving; whatever is still buffered stays for :meth:`take_buffered`."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def take_buffered(self) -> list[Msg]:
        """Hand over the messages delivered but not fetched yet (to nak them at stop)."""
        taken = list(self._buffer)
        self._buffer.clear()
        return taken

    async def fetch(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` messages; waits up to ``wait_s`` seconds when none are available."""
        taken = await self.fetch_available(batch, wait_s)
        if taken:
            return taken
        expires_ns = int(max(wait_s - _EXPIRES_MARGIN_S, 0.01) * 1e9)
        await self._request(1, wait_s, {"batch": 1, "expires": expires_ns})
        return self._take(batch)

    async def fetch_available(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` of the messages available now: never waits for new ones to arrive.

        ``wait_s`` bounds only the wait for the server's answer to the request.
        """
        if self._sub is None:
            raise RuntimeError("PullFetcher.start() first")
        missing = batch - len(self._buffer)
        if missing > 0:
            await self._request(missing, wait_s, {"batch": missing, "no_wait": True})
        return self._take(batch)

    def _take(self, batch: int) -> list[Msg]:
        buffer = self._buffer
        if len(buffer) <= batch:
            taken = list(buffer)
            buffer.clear()
            return taken
        return [buffer.popleft() for _ in range(batch)]

    async def _request(self, want: int, wait_s: float, request: dict[str, object]) -> None:
        self._want = len(self._buffer) + want
        self._ready.clear()
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self._inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._ready.wait()

    async def _on_msg(self, msg: Msg) -> None:
        reply = msg.reply
        if reply and reply.startswith(_JS_ACK_PREFIX):
            self._buffer.append(msg)
            if len(self._buffer) >= self._want:
                self._ready.set()
            return
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status not in _EXPECTED_STATUS:
            # Counted always, logged at the first and then every hundredth: a consumer deleted
            # under a running collector answers every request so.
            self.unexpected_status += 1
            if self.on_status is not None:
                self.on_status(status)
            if self.unexpected_status % 100 == 1:
                log.warning(
                    "pull request answered with a status",
                    extra={"status": status, "description": headers.get("Description", "")},
                )
        self._ready.set()
