"""The route registry: each route's method, path, role and models, in one place.

Registering a handler here both mounts it (validating the query, path and body before the
handler runs and serializing what it returns) and describes it for the OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from micboard.collector.api.auth import Principal, Role
from micboard.collector.api.errors import ApiError, ApiErrorCode
from micboard.collector.api.models import MAX_ID, NoBody, NoQuery

QueryT = TypeVar("QueryT", bound=BaseModel)
BodyT = TypeVar("BodyT", bound=BaseModel)

MAX_BODY_BYTES = 256 * 1024
_PATH_PARAM = re.compile(r"{([a-z_]+)}")

AUTHENTICATE: web.AppKey[Callable[[web.Request, Role], Awaitable[Principal]]] = web.AppKey("authenticate")


@dataclass(frozen=True, slots=True)
class Call(Generic[QueryT, BodyT]):
    """A validated request: who calls, its query, path parameters and body."""

    request: web.Request
    principal: Principal | None
    query: QueryT
    body: BodyT
    path: dict[str, int]

    @property
    def app(self) -> web.Application:
        """The application (to reach its services)."""
        return self.request.app

    @property
    def actor(self) -> str:
        """Who to record as having done something: the token's name."""
        return self.principal.name if self.principal is not None else "anonymous"


@dataclass(frozen=True, slots=True)
class JsonBody:
    """A response body a handler serialized itself, in the shape of its route's ``response`` model.

    For listings built from the database's typed columns: validating and serializing them again
    through the model, item by item, was most of a list request's CPU. The model still describes
    the body in the OpenAPI document, and the API tests check the bodies against it.
    """

    body: bytes

    @classmethod
    def page(cls, items: list[dict[str, Any]], total: int, limit: int, offset: int) -> JsonBody:
        """A page whose ``items`` already have the fields, order and types of its item model."""
        return cls(orjson.dumps({"items": items, "total": total, "limit": limit, "offset": offset}))


Handler = Callable[[Call[Any, Any]], Awaitable[BaseModel | JsonBody | None]]


@dataclass(frozen=True, slots=True)
class Route:
    """A registered route and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    summary: str
    role: Role | None
    query: type[BaseModel]
    body: type[BaseModel]
    response: type[BaseModel] | None
    status: int
    tag: str

    @property
    def path_params(self) -> list[str]:
        """Names of the path's integer parameters."""
        return _PATH_PARAM.findall(self.path)

    @property
    def operation_id(self) -> str:
        """A stable name for the operation."""
        return self.handler.__name__


@dataclass(slots=True)
class RouteTable:
    """Routes of the API, collected by the ``routes_*`` modules' decorators."""

    routes: list[Route] = field(default_factory=list)

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        role: Role | None,
        query: type[QueryT],
        body: type[BodyT],
        response: type[BaseModel] | None,
        status: int = 200,
        tag: str = "fleet",
    ) -> Callable[
        [Callable[[Call[QueryT, BodyT]], Awaitable[Any]]], Callable[[Call[QueryT, BodyT]], Awaitable[Any]]
    ]:
        """Register the decorated handler for ``method path``."""

        def register(
            handler: Callable[[Call[QueryT, BodyT]], Awaitable[Any]],
        ) -> Callable[[Call[QueryT, BodyT]], Awaitable[Any]]:
            self.routes.append(
                Route(method, path, handler, summary, role, query, body, response, status, tag)
            )
            return handler

        return register

    def mount(self, app: web.Application) -> None:
        """Add every route to ``app``'s router."""
        for route in self.routes:
            # Integer path parameters only: anything else cannot name a resource, so it is a 404.
            aio_path = _PATH_PARAM.sub(lambda m: "{" + m.group(1) + r":\d{1,10}}", route.path)
            app.router.add_route(route.method, aio_path, _endpoint(route))


def _errors_text(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)[:5]
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]
    more = exc.error_count() - len(errors)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _parse_query(route: Route, request: web.Request) -> BaseModel:
    raw = request.rel_url.query
    values: dict[str, str] = {}
    for key, value in raw.items():
        if key in values:
            raise ApiError(
                400, ApiErrorCode.INVALID_QUERY, f"query parameter {key!r} is given more than once"
            )
        values[key] = value
    try:
        return route.query.model_validate(values)
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden" and e["loc"]]
        if unknown:
            raise ApiError(
                400, ApiErrorCode.INVALID_QUERY, f"unknown query parameters: {', '.join(sorted(unknown))}"
            ) from None
        raise ApiError(400, ApiErrorCode.INVALID_QUERY, _errors_text(exc)) from None


async def _parse_body(route: Route, request: web.Request) -> BaseModel:
    if route.body is NoBody:
        return NoBody()
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, ApiErrorCode.BODY_TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise ApiError(415, ApiErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, ApiErrorCode.BODY_TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        raise ApiError(400, ApiErrorCode.INVALID_BODY, "a JSON body is required")
    try:
        return route.body.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ApiError(400, ApiErrorCode.INVALID_BODY, "the body is not valid JSON") from None
        raise ApiError(400, ApiErrorCode.INVALID_BODY, _errors_text(exc)) from None


def _parse_path(route: Route, request: web.Request) -> dict[str, int]:
    path: dict[str, int] = {}
    for name in route.path_params:
        value = int(request.match_info[name])
        if not 0 < value <= MAX_ID:
            raise ApiError(404, ApiErrorCode.NOT_FOUND, f"no resource with {name} {value}")
        path[name] = value
    return path


def _endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        principal = None
        if route.role is not None:
            principal = await request.app[AUTHENTICATE](request, route.role)
        call: Call[Any, Any] = Call(
            request=request,
            principal=principal,
            query=_parse_query(route, request) if route.query is not NoQuery else NoQuery(),
            body=await _parse_body(route, request),
            path=_parse_path(route, request),
        )
        if route.query is NoQuery and request.rel_url.query:
            raise ApiError(
                400,
                ApiErrorCode.INVALID_QUERY,
                f"unknown query parameters: {', '.join(sorted(request.rel_url.query))}",
            )
        result = await route.handler(call)
        if result is None:
            return web.Response(status=route.status)
        body = result.body if isinstance(result, JsonBody) else result.model_dump_json().encode()
        return web.Response(status=route.status, body=body, content_type="application/json")

    endpoint.__name__ = route.operation_id
    return endpoint
