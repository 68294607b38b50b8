"""Prometheus text exposition on a loopback port, served by a tiny asyncio HTTP responder.

Off unless ``metrics_port`` is set. It answers ``GET /metrics`` (and ``/``) with the text format
0.0.4 and anything else with 404; one request per connection, each read bounded by a timeout,
so a stuck scraper cannot hold the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0
_MAX_REQUEST_BYTES = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class Metric:
    """One metric family: name, help, type and its samples (labels -> value)."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        """Add one sample; returns ``self`` for chaining."""
        self.samples.append((labels, value))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: Iterable[Metric]) -> str:
    """The Prometheus text format of ``metrics``."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            number = repr(float(value)) if not float(value).is_integer() else str(int(value))
            lines.append(
                f"{metric.name}{{{label_text}}} {number}" if label_text else f"{metric.name} {number}"
            )
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``collect()`` as Prometheus text on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self, collect: Callable[[], Iterable[Metric]], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._collect = collect
        self.host = host
        self.port = port
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and serve; afterwards ``port`` is the bound port."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics listening", extra={"address": f"{self.host}:{self.port}"})

    async def close(self) -> None:
        """Stop serving and end open requests; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._answer(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the scraper went away or sent nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        if len(head) > _MAX_REQUEST_BYTES:
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        self.requests += 1
        if len(parts) == 3 and parts[0] in ("GET", "HEAD") and parts[1].split("?")[0] in ("/metrics", "/"):
            body = render(self._collect()).encode("utf-8")
            status, content_type = "200 OK", CONTENT_TYPE
        else:
            body, status, content_type = b"not found\n", "404 Not Found", "text/plain; charset=utf-8"
        headers = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        writer.write(headers if parts[0] == "HEAD" else headers + body)
        await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
