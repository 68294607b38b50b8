"""The agent's metrics responder on a real socket: oversized and cut-off requests, HEAD, lifecycle."""

from __future__ import annotations

import asyncio

from micboard.agent.metrics import Metric, MetricsServer


async def exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bad_requests_get_no_answer_and_the_server_goes_on() -> None:
    server = MetricsServer(lambda: [Metric("up", "Up.", "gauge").add(1)])
    await server.close()  # never started: nothing to do
    await server.start()
    port = server.port
    await server.start()  # started already: same socket
    assert server.port == port
    try:
        # A head over 8 KiB is dropped unanswered; so is one cut off before its end.
        assert await exchange(port, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n") == b""
        assert await exchange(port, b"GET /metrics HTTP/1.1\r\n", half_close=True) == b""
        assert server.requests == 0
        head = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")  # headers only
        body = await exchange(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert body.endswith(b"# TYPE up gauge\nup 1\n")
        assert server.requests == 2
    finally:
        await server.close()
    await server.close()
