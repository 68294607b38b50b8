"""The OpenAPI 3.1 document, generated from the route registry and the handlers' own models,
and a dependency-free docs page that renders it."""

from __future__ import annotations

import inspect
from importlib import resources
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from micboard.collector.api.models import MAX_ID, Health, NoQuery, Problem
from micboard.collector.api.routing import Route
from micboard.shared import __version__

_REF = "#/components/schemas/{model}"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_AUTH_ERRORS = {
    "401": "no token, or a token that is not valid",
    "403": "the token's role does not allow this",
    "429": "too many failed authentication attempts from this address",
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM_REF}}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    if model is NoQuery:
        return []
    schema = model.model_json_schema(ref_template=_REF, mode="validation")
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _path_parameters(route: Route) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
        }
        for name in route.path_params
    ]


def build_openapi(routes: list[Route], *, server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` plus the unauthenticated service endpoints."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (Problem, "serialization"),
        (Health, "serialization"),
    ]
    for route in routes:
        if route.response is not None:
            wanted.append((route.response, "serialization"))
        if route.method in ("POST", "PUT", "PATCH") and route.body.model_fields:
            wanted.append((route.body, "validation"))
    unique = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(unique, ref_template=_REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag],
            "parameters": _path_parameters(route) + _query_parameters(route.query),
        }
        # Without its indentation: a docstring's later lines would read as a code block.
        doc = inspect.cleandoc(route.handler.__doc__ or "")
        if doc:
            operation["description"] = doc
        if route.role is not None:
            operation["security"] = [{"bearerAuth": []}]
            operation["x-required-role"] = route.role.value
        else:
            operation["security"] = []
        if route.method in ("POST", "PUT", "PATCH") and route.body.model_fields:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        responses: dict[str, Any] = {}
        if route.response is None:
            responses[str(route.status)] = {"description": "done"}
        else:
            responses[str(route.status)] = {
                "description": "success",
                "content": {"application/json": {"schema": refs[(route.response, "serialization")]}},
            }
        responses["400"] = _problem("an unknown or invalid query parameter, path or body")
        if route.role is not None:
            for status, description in _AUTH_ERRORS.items():
                responses[status] = _problem(description)
        if route.path_params:
            responses["404"] = _problem("no such resource")
        if route.method in ("POST", "PUT", "PATCH") and route.body.model_fields:
            responses["413"] = _problem("the body is too large")
            responses["415"] = _problem("the body is not JSON")
        if route.tag == "alerts" and route.method == "POST":
            responses["409"] = _problem("the alert's state does not allow this")
        if route.method == "DELETE" and route.path == "/api/v1/devices/{id}":
            responses["409"] = _problem("its agent still reports the receiver online")
        if route.path == "/api/v1/agents/forget":
            responses["404"] = _problem("no such agent")
            responses["409"] = _problem("the agent is still heard")
        responses["503"] = _problem(
            "the database cannot be reached (with Retry-After), or a service this needs is not "
            "available in this process"
        )
        operation["responses"] = responses
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Whether the database and NATS are reachable",
            "tags": ["service"],
            "security": [],
            "responses": {
                "200": {
                    "description": "healthy",
                    "content": {"application/json": {"schema": refs[(Health, "serialization")]}},
                },
                "503": {
                    "description": "unhealthy",
                    "content": {"application/json": {"schema": refs[(Health, "serialization")]}},
                },
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "tags": ["service"],
            "security": [],
            "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
            },
        }
    }
    paths["/api/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["service"],
            "security": [{"bearerAuth": []}],
            "x-required-role": "viewer",
            "responses": {
                "200": {
                    "description": "the OpenAPI document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "400": _problem("an unknown query parameter"),
                "401": _problem("no token, or a token that is not valid"),
                "429": _problem("too many failed authentication attempts from this address"),
            },
        }
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "micboard fleet collector API",
            "version": __version__,
            "description": (
                "Read the fleet's sites, agents, receivers and channels; handle alerts; send commands. "
                "Every endpoint under /api/v1 needs `Authorization: Bearer <token>` (roles viewer < operator "
                "< admin). Errors are application/problem+json with a stable `code`. Live updates: "
                "WebSocket /api/v1/live (authenticate with the first message)."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def docs_html() -> str:
    """The docs page: plain HTML that fetches the document with the tab's token and lists it."""
    return resources.files(__package__).joinpath("docs.html").read_text(encoding="utf-8")
