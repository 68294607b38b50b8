"""Reading the live WebSocket as a client must: a ``batch`` frame's items one by one."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections import deque
from typing import Any

import aiohttp

#: Messages of a ``batch`` frame not read yet, by socket.
_unread: weakref.WeakKeyDictionary[aiohttp.ClientWebSocketResponse, deque[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


async def next_message(
    ws: aiohttp.ClientWebSocketResponse,
    timeout_s: float,
    *,
    check_batches: bool = False,
    keepalives: bool = False,
) -> dict[str, Any]:
    """The next message on ``ws``; ``check_batches`` also asserts the server's batching rules.

    ``keepalive`` messages (sent every ``KEEPALIVE_S`` whatever else happens) are skipped
    unless ``keepalives``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        message = await _next_any(ws, deadline - loop.time(), check_batches)
        if keepalives or message["type"] != "keepalive":
            return message


async def _next_any(
    ws: aiohttp.ClientWebSocketResponse, timeout_s: float, check_batches: bool
) -> dict[str, Any]:
    unread = _unread.setdefault(ws, deque())
    if not unread:
        msg = await ws.receive(timeout=max(0.01, timeout_s))
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data: dict[str, Any] = json.loads(msg.data)
        if data["type"] == "batch":
            if check_batches:
                assert len(data["items"]) > 1, "a single message comes as itself, not as a batch"
                assert all(item["type"] not in ("batch", "snapshot") for item in data["items"]), data
            unread.extend(data["items"])
        else:
            unread.append(data)
    return unread.popleft()
