"""The error middleware on a real HTTP server: every failure kind, request ids, the observer and logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from micboard.collector.api.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    ApiErrorCode,
    error_middleware,
    problem_body,
    request_id_of,
)
from micboard.collector.errors import (
    AlertNotFoundError,
    CollectorError,
    CollectorErrorCode,
    InvalidTransitionError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def traceback_of(record: logging.LogRecord) -> str:
    """The record's traceback: still attached, or already rendered (and redacted) by the log filter."""
    if record.exc_info:
        return logging.Formatter().formatException(record.exc_info)
    return str(getattr(record, "exc", ""))


def raising(exc: BaseException) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        raise exc

    return handler


async def streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    await response.prepare(request)
    await response.write(b"chunk")
    await response.write_eof()
    return response


async def echo_id(request: web.Request) -> web.StreamResponse:
    return web.json_response({"request_id": request_id_of(request)})


async def read_body(request: web.Request) -> web.StreamResponse:
    return web.json_response({"size": len(await request.read())})


@dataclass
class Server:
    base: str
    session: aiohttp.ClientSession
    observed: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    observed: list[tuple[str, int]] = []

    def observe(request: web.Request, status: int, elapsed_s: float) -> None:
        assert elapsed_s >= 0
        observed.append((request.path, status))

    app = web.Application(middlewares=[error_middleware(observe)], client_max_size=64)
    routes: dict[str, Handler] = {
        "/api-error": raising(ApiError(401, ApiErrorCode.AUTH_MISSING, "no token", headers={"X-A": "1"})),
        "/conflict": raising(InvalidTransitionError(7, "resolved", "acknowledged")),
        "/gone": raising(AlertNotFoundError(9)),
        "/collector-other": raising(CollectorError(CollectorErrorCode.COMMAND_INVALID, "bad command")),
        "/redirect": raising(web.HTTPFound("/echo")),
        "/teapot": raising(web.HTTPBadRequest(reason="odd request")),
        "/unavailable": raising(web.HTTPServiceUnavailable()),
        "/too-large": raising(web.HTTPRequestEntityTooLarge(max_size=64, actual_size=100)),
        "/crash": raising(RuntimeError("boom")),
        "/stream": streamed,
        "/echo": echo_id,
    }
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    app.router.add_post("/body", read_body)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Server(f"http://127.0.0.1:{port}", session, observed)
    await runner.cleanup()


async def fetch(
    server: Server,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, dict[str, object] | None, CIMultiDictProxy[str]]:
    async with server.session.request(
        method, server.base + path, allow_redirects=False, headers=headers, data=data
    ) as response:
        body = (
            await response.json(content_type=None)
            if response.content_type in (PROBLEM_CONTENT_TYPE, "application/json")
            else None
        )
        return response.status, body, response.headers


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/conflict", 409, "alert.invalid_transition"),
        ("/gone", 404, "alert.not_found"),
        ("/collector-other", 400, "command.invalid"),
        ("/teapot", 400, "request.bad_request"),
        ("/unavailable", 503, "internal"),
        ("/too-large", 413, "request.body_too_large"),
        ("/nowhere", 404, "request.not_found"),
    ],
)
async def test_failures_become_problem_json(server: Server, path: str, status: int, code: str) -> None:
    got, body, headers = await fetch(server, "GET", path)
    assert got == status and body is not None
    assert body == problem_body(status, code, str(body["detail"]))
    assert body["title"] != "Error" and body["detail"]
    assert headers["Content-Type"].startswith(PROBLEM_CONTENT_TYPE)
    assert len(str(headers["X-Request-Id"])) == 32  # made here: no id was given
    assert server.observed == [(path, status)]


async def test_http_exception_reason_is_the_detail(server: Server) -> None:
    _, body, _ = await fetch(server, "GET", "/teapot")
    assert body is not None and body["detail"] == "odd request"


async def test_method_not_allowed_names_the_allowed_methods(server: Server) -> None:
    status, body, headers = await fetch(server, "DELETE", "/echo")
    assert status == 405 and body is not None and body["code"] == "request.method_not_allowed"
    assert "GET" in str(headers["Allow"]) and "GET" in str(body["detail"])


async def test_body_over_the_limit_is_413(server: Server) -> None:
    status, body, _ = await fetch(server, "POST", "/body", data=b"x" * 1000)
    assert status == 413 and body is not None and body["code"] == "request.body_too_large"
    status, body, _ = await fetch(server, "POST", "/body", data=b"small")
    assert status == 200 and body is not None and body["size"] == 5


async def test_redirects_pass_through_untouched(server: Server) -> None:
    status, body, headers = await fetch(server, "GET", "/redirect")
    assert status == 302 and body is None and headers["Location"] == "/echo"
    # The redirect left the middleware as an exception: it was neither observed nor given an id.
    assert server.observed == []


async def test_auth_failure_keeps_headers_and_is_logged_without_secrets(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="micboard.collector.api.errors"):
        status, body, headers = await fetch(
            server,
            "GET",
            "/api-error",
            headers={"Authorization": "Bearer top-secret-token", "X-Request-Id": "req-42"},
        )
    assert status == 401 and body is not None and body["code"] == "auth.missing"
    assert headers["X-A"] == "1" and headers["X-Request-Id"] == "req-42"
    [refused] = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert refused.__dict__["request_id"] == "req-42" and refused.__dict__["code"] == "auth.missing"
    assert refused.__dict__["client"] == "127.0.0.1"
    assert "top-secret-token" not in caplog.text
    [finished] = [r for r in caplog.records if r.getMessage() == "request"]
    assert finished.levelno == logging.INFO and finished.__dict__["status"] == 401


async def test_crash_is_500_naming_the_request_and_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="micboard.collector.api.errors"):
        status, body, headers = await fetch(server, "GET", "/crash", headers={"X-Request-Id": "crash-1"})
    assert status == 500 and body is not None and body["code"] == "internal"
    assert body["detail"] == "internal error (request crash-1)" and "boom" not in str(body)
    assert headers["X-Request-Id"] == "crash-1"
    [logged] = [r for r in caplog.records if r.getMessage() == "unhandled error in request"]
    assert "RuntimeError: boom" in traceback_of(logged) and logged.__dict__["path"] == "/crash"


async def test_request_ids_given_valid_are_kept_invalid_are_replaced(server: Server) -> None:
    _, body, headers = await fetch(server, "GET", "/echo", headers={"X-Request-Id": "abc.DEF_1:2-3"})
    assert body == {"request_id": "abc.DEF_1:2-3"} and headers["X-Request-Id"] == "abc.DEF_1:2-3"
    for bad in ("has space", "x" * 65, "semi;colon"):
        _, body, headers = await fetch(server, "GET", "/echo", headers={"X-Request-Id": bad})
        assert body is not None and body["request_id"] != bad
        assert headers["X-Request-Id"] == body["request_id"]


async def test_streamed_response_is_observed_without_a_late_header(server: Server) -> None:
    async with server.session.get(server.base + "/stream") as response:
        assert response.status == 200 and await response.read() == b"chunk"
        # Headers were sent before the middleware saw the response: none can be added then.
        assert "X-Request-Id" not in response.headers
    assert server.observed == [("/stream", 200)]


async def test_request_id_of_a_request_without_one_is_a_dash() -> None:
    app = web.Application()  # no middleware: nothing gives the request an id

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=request_id_of(request))

    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{runner.addresses[0][1]}/") as response,
        ):
            assert await response.text() == "-"
    finally:
        await runner.cleanup()


def test_unknown_status_title_and_api_error_defaults() -> None:
    assert problem_body(418, "x.y", "short and stout")["title"] == "Error"
    error = ApiError(404, CollectorErrorCode.DEVICE_NOT_FOUND, "no such device")
    assert (error.code, error.headers, str(error)) == ("device.not_found", {}, "no such device")


async def test_middleware_without_an_observer_still_answers() -> None:
    app = web.Application(middlewares=[error_middleware()])
    app.router.add_get("/crash", raising(RuntimeError("boom")))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{runner.addresses[0][1]}/crash") as response,
        ):
            body = await response.json(content_type=None)
            assert response.status == 500 and body["code"] == "internal"
    finally:
        await runner.cleanup()
