"""Every API error as ``application/problem+json`` with a stable code, through one middleware.

The middleware also gives each request an id (``X-Request-Id`` in and out, and in every log line
about the request) and times it for the latency histogram.
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

from micboard.collector.errors import CollectorError, CollectorErrorCode

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
"""Where a request's id is kept on the request."""


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
    code = ApiErrorCode.INTERNAL if exc.status >= 500 else ApiErrorCode.INVALID_QUERY
    return ApiError(exc.status, code, exc.reason or "request refused")


def request_id_of(request: web.Request) -> str:
    """The id of ``request`` (given by the client in ``X-Request-Id`` or made here)."""
    value = request.get(REQUEST_ID)
    return value if isinstance(value, str) else "-"


RequestObserver = Callable[[web.Request, int, float], None]
"""Called once per finished request with its status and duration in seconds (for metrics)."""


def error_middleware(observe: RequestObserver | None = None) -> Any:
    """The one middleware that turns every failure into problem+json, ids requests and times them."""

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
        except Exception:
            log.exception(
                "unhandled error in request",
                extra={"request_id": request_id, "method": request.method, "path": request.path},
            )
            response = problem_response(500, ApiErrorCode.INTERNAL, f"internal error (request {request_id})")
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        elapsed = time.perf_counter() - started
        if observe is not None:
            observe(request, response.status, elapsed)
        level = logging.DEBUG if response.status < 400 else logging.INFO
        log.log(
            level,
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        return response

    return middleware


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
