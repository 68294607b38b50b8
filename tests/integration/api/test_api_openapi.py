"""The OpenAPI document: valid 3.1, generated from the handlers' models, with every route; the docs page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from openapi_spec_validator import validate

from micboard.collector.api.app import ROUTES

if TYPE_CHECKING:
    from tests.live_api import LiveApi


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


async def test_document_is_valid_and_complete(api: LiveApi) -> None:
    status, spec = await api.get("/api/v1/openapi.json")
    assert status == 200
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    for route in ROUTES:
        operation = spec["paths"][route.path][route.method.lower()]
        assert operation["x-required-role"] == route.role.value if route.role else operation["security"] == []
        assert str(route.status) in operation["responses"]
        if route.response is not None:
            ref = operation["responses"][str(route.status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{route.response.__name__}"
    schemas = spec["components"]["schemas"]
    for ref in _refs(spec):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    channel = schemas["ChannelItem"]["properties"]
    assert set(channel["battery_state"]["enum"]) >= {"good", "previously_critical"}
    devices = spec["paths"]["/api/v1/devices"]["get"]
    params = {p["name"]: p for p in devices["parameters"]}
    assert set(params) == {"limit", "offset", "site", "status", "vendor", "q", "low_battery", "sort"}
    assert params["limit"]["schema"]["maximum"] == 1000
    assert devices["responses"]["401"]["content"]["application/problem+json"]["schema"]["$ref"].endswith(
        "/Problem"
    )
    assert spec["paths"]["/healthz"]["get"]["security"] == []


async def test_document_needs_a_token(api: LiveApi) -> None:
    status, body = await api.get("/api/v1/openapi.json", role=None)
    assert status == 401 and body["code"] == "auth.missing"


async def test_docs_page_is_served_without_a_token(api: LiveApi) -> None:
    status, body, response = await api.call("GET", "/api/v1/docs", role=None)
    assert status == 200 and response.content_type == "text/html"
    assert "openapi.json" in body and "sessionStorage" in body and "<script src=" not in body
    assert "http" not in body.split("<script>")[1], "the page loads nothing from elsewhere"


def test_the_document_does_not_depend_on_a_server(tmp_path: Path) -> None:
    from micboard.collector.api.openapi import build_openapi

    spec = build_openapi(ROUTES, server_url="http://127.0.0.1:8080")
    validate(spec)
    assert spec["servers"] == [{"url": "http://127.0.0.1:8080"}]
