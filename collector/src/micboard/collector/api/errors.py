"""Every API error as ``application/problem+json`` with a stable code, through one middleware.

The middleware also gives each request an id (``X-Request-Id`` in and out, and in every log line
about the request), times it for the metrics and logs one line per request: at INFO, except the
endpoints polled by machines (:data:`QUIET_ROUTES`), at DEBUG.

A database that cannot be reached answers 503 ``service.unavailable`` with ``Retry-After`` and
one warning line, not a 500 and a traceback per request: during an outage every request fails
the same way, and the journal should say so once per request, briefly.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from aiohttp import web
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from micboard.collector.errors import CollectorError, CollectorErrorCode

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
"""Where a request's id is kept on the request."""

QUIET_ROUTES = frozenset({"/healthz", "/metrics", "/api/v1/live"})
"""Routes whose request lines are logged at DEBUG: Prometheus and health probes come every few
seconds and would fill the journal, and a live WebSocket's line comes only when it closes."""

RETRY_AFTER_S = 5
"""What ``Retry-After`` asks of a client while the database cannot be reached."""


class ApiErrorCode(StrEnum):
    """Stable codes of API errors; clients branch on these, never on the text."""

    AUTH_MISSING = "auth.missing"
    AUTH_INVALID = "auth.invalid"
    AUTH_FORBIDDEN = "auth.forbidden"
    AUTH_RATE_LIMITED = "auth.rate_limited"
    INVALID_QUERY = "request.invalid_query"
    INVALID_BODY = "request.invalid_body"
    INVALID_PATH = "request.invalid_path"
    NOT_FOUND = "request.not_found"
    METHOD_NOT_ALLOWED = "request.method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "request.unsupported_media_type"
    BODY_TOO_LARGE = "request.body_too_large"
    BAD_REQUEST = "request.bad_request"
    GROUP_NOT_FOUND = "group.not_found"
    TOKEN_NOT_FOUND = "token.not_found"  # noqa: S105  # nosec B105  # an error code
    SERVICE_UNAVAILABLE = "service.unavailable"
    INTERNAL = "internal"


class ApiError(Exception):
    """An error the API answers with: an HTTP status, a stable code and a message for people."""

    def __init__(
        self,
        status: int,
        code: ApiErrorCode | CollectorErrorCode | str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = str(code)
        self.detail = detail
        self.headers = headers or {}


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# Collector service errors by code: "not found" is a 404, a refused argument a 400, a state
# that does not allow the action a 409.
_COLLECTOR_STATUS: dict[str, int] = {
    CollectorErrorCode.ALERT_NOT_FOUND: 404,
    CollectorErrorCode.DEVICE_NOT_FOUND: 404,
    CollectorErrorCode.AGENT_NOT_FOUND: 404,
    CollectorErrorCode.CHANNEL_NOT_FOUND: 404,
    CollectorErrorCode.WEBHOOK_NOT_FOUND: 404,
    CollectorErrorCode.ALERT_INVALID_TRANSITION: 409,
    CollectorErrorCode.DEVICE_STILL_REPORTED: 409,
    CollectorErrorCode.AGENT_STILL_REPORTING: 409,
}


def problem_body(status: int, code: str, detail: str) -> dict[str, Any]:
    """The problem+json document of an error."""
    return {
        "type": f"urn:micboard:error:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }


def problem_response(
    status: int, code: str, detail: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """An ``application/problem+json`` response."""
    return web.Response(
        status=status,
        text=json.dumps(problem_body(status, code, detail)),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    if exc.status == 404:
        return ApiError(404, ApiErrorCode.NOT_FOUND, "no such resource")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return ApiError(
            405,
            ApiErrorCode.METHOD_NOT_ALLOWED,
            f"method not allowed; allowed: {allowed}",
            headers={"Allow": allowed},
        )
    if exc.status == 413:
        return ApiError(413, ApiErrorCode.BODY_TOO_LARGE, "request body too large")
    if exc.status >= 500:
        return ApiError(exc.status, ApiErrorCode.INTERNAL, exc.reason or "internal error")
    return ApiError(exc.status, ApiErrorCode.BAD_REQUEST, _http_detail(exc))


def _http_detail(exc: web.HTTPException) -> str:
    # aiohttp says what was wrong in the text (a WebSocket handshake names the header it lacks);
    # an exception raised without a text only has "<status>: <reason>" there, and the reason says it.
    text = " ".join(exc.text.split()) if exc.text else ""
    if text and text != f"{exc.status}: {exc.reason}":
        return text[:300]
    return exc.reason or "request refused"


# SQLite's primary result codes of a database file that cannot be used: busy or locked past
# the busy timeout, out of memory, I/O error, disk full, cannot open, lock protocol. A wrong
# statement ("no such table") is SQLITE_ERROR, also raised as an OperationalError.
_SQLITE_UNAVAILABLE = frozenset({5, 6, 7, 10, 13, 14, 15})
# PostgreSQL SQLSTATE classes of a server that cannot serve: connection exception, insufficient
# resources (too many connections, disk full), operator intervention (shutting down, starting
# up, statement timeout), system error (I/O).
_PG_UNAVAILABLE = frozenset({"08", "53", "57", "58"})


def _store_unreachable(exc: Exception) -> bool:
    """Whether ``exc`` means the database (or another service the request needs) could not be reached.

    Not a wrong statement nor a refused value: those stay 500 with their traceback. A driver
    that cannot even connect (asyncpg to a port nobody listens on) raises a bare OSError or
    TimeoutError, as does any other service that does not answer.
    """
    if isinstance(exc, OSError | TimeoutError | PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True  # a connection lost mid-request, or one the driver could not use
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _PG_UNAVAILABLE
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        return sqlite_code & 0xFF in _SQLITE_UNAVAILABLE  # extended codes keep the primary in the low byte
    # Another driver: the DB-API's OperationalError is "not under the programmer's control".
    return isinstance(exc, OperationalError)


def _describe(exc: Exception) -> str:
    # The driver's own message: SQLAlchemy's text would add the statement and its parameters
    # (a token's digest, for one), which have no place in a log line.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return f"{type(cause).__name__}: {cause}"[:300]


def route_of(request: web.Request) -> str:
    """The route template ``request`` matched (``/api/v1/devices/{id}``), or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_id_of(request: web.Request) -> str:
    """The id of ``request`` (given by the client in ``X-Request-Id`` or made here)."""
    value = request.get(REQUEST_ID)
    return value if isinstance(value, str) else "-"


RequestObserver = Callable[[web.Request, int, float], None]
"""Called once per finished request with its status and duration in seconds (for metrics).

A WebSocket's request finishes when the connection closes; its status is then 101."""


def error_middleware(observe: RequestObserver | None = None) -> Any:
    """The one middleware that turns every failure into problem+json, ids requests, times and logs them.

    The request line (``request``: method, route, path, status, duration, request id) never
    holds the query string nor a header, so no token or query value reaches the log.
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        started = time.perf_counter()
        response: web.StreamResponse
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(request, exc)
        except CollectorError as exc:
            status = _COLLECTOR_STATUS.get(exc.code, 400)
            response = _error_response(request, ApiError(status, str(exc.code), exc.message))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(request, _from_http_exception(exc))
        except Exception as exc:  # noqa: BLE001 - every failure gets an answer, and is logged there
            response = _unexpected_response(request, request_id, exc)
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        elapsed = time.perf_counter() - started
        if observe is not None:
            observe(request, response.status, elapsed)
        route = route_of(request)
        # Every request at INFO, so that the request id a client reports can be found in the
        # journal at the default level; probes, scrapes and WebSockets (whose line comes when
        # they close) at DEBUG.
        quiet = route in QUIET_ROUTES or isinstance(response, web.WebSocketResponse)
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "path": request.path,  # never the query string: it may hold anything
                "status": response.status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        return response

    return middleware


def _unexpected_response(request: web.Request, request_id: str, exc: Exception) -> web.Response:
    """The answer to an exception no handler turned into an error: 503 or 500."""
    if _store_unreachable(exc):
        # Expected while the database is away, and the same for every request: a line each,
        # without a traceback that would say nothing new.
        log.warning(
            "request failed: database or service unreachable",
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route_of(request),
                "error": _describe(exc),
            },
        )
        return problem_response(
            503,
            ApiErrorCode.SERVICE_UNAVAILABLE,
            f"the database or a service this request needs is not reachable; try again later "
            f"(request {request_id})",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    log.error(
        "unhandled error in request",
        exc_info=exc,
        extra={"request_id": request_id, "method": request.method, "path": request.path},
    )
    return problem_response(500, ApiErrorCode.INTERNAL, f"internal error (request {request_id})")


def _error_response(request: web.Request, exc: ApiError) -> web.Response:
    # Auth failures log the reason and the client, never the Authorization header.
    if exc.status in (401, 403, 429):
        log.info(
            "request refused",
            extra={
                "request_id": request_id_of(request),
                "code": exc.code,
                "client": request.remote,
                "path": request.path,
            },
        )
    return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers)
