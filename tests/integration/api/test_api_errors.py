"""Every error path answers problem+json with a stable code, never a 500 for bad input."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
from tests.waiting import until

if TYPE_CHECKING:
    from tests.live_api import LiveApi


def assert_problem(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert body["code"] == code and body["status"] == expected_status
    assert body["type"] == f"urn:micboard:error:{code}" and body["title"] and body["detail"]


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/api/v1/devices", {"colour": "red"}, "unknown query parameters: colour"),
        ("/api/v1/devices", {"limit": "0"}, "limit"),
        ("/api/v1/devices", {"limit": "1001"}, "limit"),
        ("/api/v1/devices", {"limit": "ten"}, "limit"),
        ("/api/v1/devices", {"offset": "-1"}, "offset"),
        ("/api/v1/devices", {"sort": "password"}, "sort"),
        ("/api/v1/devices", {"status": "asleep"}, "status"),
        ("/api/v1/devices", {"low_battery": "maybe"}, "low_battery"),
        ("/api/v1/devices", {"q": "a\x00b"}, "q"),
        ("/api/v1/channels", {"device_id": "99999999999"}, "device_id"),
        ("/api/v1/channels", {"site": "NOT A SITE"}, "site"),
        ("/api/v1/sites", {"worst": "terrible"}, "worst"),
        ("/api/v1/alerts", {"state": "forgotten"}, "state"),
        ("/api/v1/devices/1", {"x": "1"}, "unknown query parameters: x"),
    ],
)
async def test_bad_query_is_400(api: LiveApi, path: str, params: dict[str, str], fragment: str) -> None:
    status, body = await api.get(path, **params)
    assert_problem(status, body, 400, "request.invalid_query")
    assert fragment in body["detail"]


async def test_repeated_query_parameter_is_400(api: LiveApi) -> None:
    status, body, _ = await api.call("GET", "/api/v1/devices?site=a&site=b")
    assert_problem(status, body, 400, "request.invalid_query")


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "request.invalid_body"),
        (b"", "application/json", 400, "request.invalid_body"),
        (b"[]", "application/json", 400, "request.invalid_body"),
        (b'{"name": ""}', "application/json", 400, "request.invalid_body"),
        (b'{"name": "x", "extra": 1}', "application/json", 400, "request.invalid_body"),
        (
            b'{"name": "x", "channels": [{"device_id": 0, "index": 1}]}',
            "application/json",
            400,
            "request.invalid_body",
        ),
        (b'{"name": "\\ud800"}', "application/json", 400, "request.invalid_body"),
        (b'{"name": "x"}', "text/plain", 415, "request.unsupported_media_type"),
        (b'{"name": "' + b"x" * 300_000 + b'"}', "application/json", 413, "request.body_too_large"),
    ],
)
async def test_bad_body(api: LiveApi, data: bytes, content_type: str, status: int, code: str) -> None:
    got, body, _ = await api.call(
        "POST", "/api/v1/groups", role="operator", data=data, headers={"Content-Type": content_type}
    )
    assert_problem(got, body, status, code)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/nothing"),
        ("GET", "/api/v1/devices/abc"),
        ("GET", "/api/v1/devices/-1"),
        ("GET", "/api/v1/devices/0"),
        ("GET", "/api/v1/devices/99999999999"),
        ("GET", "/api/v1/devices/12345678901234567890"),
    ],
)
async def test_unknown_resources_are_404(api: LiveApi, method: str, path: str) -> None:
    status, body, _ = await api.call(method, path)
    assert_problem(status, body, 404, "request.not_found")


async def test_resource_not_found_codes(api: LiveApi) -> None:
    status, body = await api.get("/api/v1/devices/42")
    assert_problem(status, body, 404, "device.not_found")
    status, body = await api.get("/api/v1/devices/42/channels/1/history")
    assert_problem(status, body, 404, "device.not_found")
    status, body, _ = await api.call(
        "POST", "/api/v1/devices/42/commands", role="operator", json={"action": "identify"}
    )
    assert_problem(status, body, 404, "device.not_found")
    status, body, _ = await api.call("POST", "/api/v1/alerts/42/acknowledge", role="operator")
    assert_problem(status, body, 404, "alert.not_found")
    status, body, _ = await api.call("PUT", "/api/v1/groups/42", role="operator", json={"name": "x"})
    assert_problem(status, body, 404, "group.not_found")
    status, body, _ = await api.call("DELETE", "/api/v1/groups/42", role="operator")
    assert_problem(status, body, 404, "group.not_found")


async def test_wrong_method_is_405_with_allow(api: LiveApi) -> None:
    status, body, response = await api.call("DELETE", "/api/v1/devices")
    assert_problem(status, body, 405, "request.method_not_allowed")
    assert "GET" in response.headers["Allow"]


async def test_request_ids(api: LiveApi) -> None:
    _, _, response = await api.call("GET", "/api/v1/sites", headers={"X-Request-Id": "desk-42"})
    assert response.headers["X-Request-Id"] == "desk-42"
    _, _, response = await api.call("GET", "/api/v1/sites", headers={"X-Request-Id": "bad id with spaces"})
    generated = response.headers["X-Request-Id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    _, _, response = await api.call("GET", "/api/v1/nothing")
    assert response.headers["X-Request-Id"]


async def test_command_arguments_are_checked(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1")])
    for bad in (
        {"action": "explode"},
        {"action": "rename", "channel": 99},
        {"action": "mute", "channel": "one"},
    ):
        status, body, _ = await api.call("POST", "/api/v1/devices/1/commands", role="operator", json=bad)
        assert_problem(status, body, 400, "request.invalid_body")
    status, body, _ = await api.call(
        "POST", "/api/v1/devices/1/commands", role="operator", json={"action": "mute"}
    )
    assert_problem(status, body, 400, "command.invalid")
    status, body, _ = await api.call(
        "POST",
        "/api/v1/devices/1/commands",
        role="operator",
        json={"action": "rename", "channel": 1, "value": "é" * 3},
    )
    assert_problem(status, body, 400, "command.invalid")
    # Blanks alone would leave the channel without a name: refused before anything is sent.
    status, body, _ = await api.call(
        "POST",
        "/api/v1/devices/1/commands",
        role="operator",
        json={"action": "rename", "channel": 1, "value": "   "},
    )
    assert_problem(status, body, 400, "command.invalid")
    assert "blank" in body["detail"]
    status, body, _ = await api.call(
        "POST", "/api/v1/devices/1/commands", role="operator", json={"action": "mute", "channel": 9}
    )
    assert_problem(status, body, 404, "device.channel_not_found")


async def test_history_arguments_are_checked(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1")])
    status, body = await api.get("/api/v1/devices/1/channels/1/history", from_ms=2000, to_ms=1000)
    assert_problem(status, body, 400, "history.invalid_query")
    # Named as the client gave them, not as the service calls them.
    assert body["detail"] == "from_ms must be before to_ms"
    status, body = await api.get("/api/v1/devices/1/channels/1/history", from_ms=api.now_ms() + 86_400_000)
    assert_problem(status, body, 400, "history.invalid_query")
    assert body["detail"] == "from_ms must be before to_ms (default: now)"
    status, body = await api.get("/api/v1/devices/1/channels/1/history", resolution_s=7)
    assert_problem(status, body, 400, "history.invalid_query")
    status, body = await api.get("/api/v1/devices/1/channels/65/history")
    assert_problem(status, body, 404, "device.channel_not_found")


async def test_history_checks_the_device_before_the_channel(api: LiveApi) -> None:
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1", bars=(4, 5))])
    # An unknown device is what is wrong, whatever the channel asked for.
    for index in (1, 65, 9999):
        status, body = await api.get(f"/api/v1/devices/42/channels/{index}/history")
        assert_problem(status, body, 404, "device.not_found")
    # A channel the two-channel receiver does not have, as the command endpoint says it.
    for index in (3, 5, 65):
        status, body = await api.get(f"/api/v1/devices/1/channels/{index}/history", from_ms=0)
        assert_problem(status, body, 404, "device.channel_not_found")
        assert body["detail"] == f"device 'rx1' on agent 'pi-a' has no channel {index}"
    status, body = await api.get("/api/v1/devices/1/channels/2/history")
    assert status == 200 and body == {"items": []}


async def test_other_http_errors_have_their_own_code(api: LiveApi) -> None:
    # A plain GET of the WebSocket endpoint: aiohttp refuses the handshake and says why.
    status, body, _ = await api.call("GET", "/api/v1/live", role=None)
    assert_problem(status, body, 400, "request.bad_request")
    assert body["title"] == "Bad Request"
    assert body["detail"] == 'No WebSocket UPGRADE hdr: None Can "Upgrade" only to "WebSocket".'
    status, body, _ = await api.call(
        "GET", "/api/v1/live", role=None, headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert_problem(status, body, 400, "request.bad_request")
    assert body["detail"].startswith("Unsupported version")


async def test_every_api_request_is_logged_at_info_without_secrets(
    api: LiveApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="micboard.collector.api.errors")
    await api.seed.devices("venue-a", "pi-a", [api.receiver("rx1")])
    secret = "s3cret-in-the-query"
    calls = [
        ("/api/v1/devices/1", {"X-Request-Id": "desk-1"}, 200),
        (f"/api/v1/devices?token={secret}", {"X-Request-Id": "desk-2"}, 400),
        ("/metrics", {"X-Request-Id": "scrape-1"}, 200),
        ("/healthz", {"X-Request-Id": "probe-1"}, 200),
    ]
    for path, headers, expected in calls:
        status, _, _ = await api.call("GET", path, headers=headers)
        assert status == expected
    ws = await api.http.ws_connect(f"{api.url}/api/v1/live", headers={"X-Request-Id": "live-1"})
    await ws.send_json({"type": "auth", "token": api.tokens["viewer"]})
    await ws.close()

    def lines() -> dict[str, logging.LogRecord]:
        return {r.__dict__["request_id"]: r for r in caplog.records if r.getMessage() == "request"}

    # A WebSocket's line comes once its handler has seen the close.
    await until(lambda: "live-1" in lines())
    logged = lines()
    found = logged["desk-1"]
    assert found.levelno == logging.INFO
    assert {k: found.__dict__[k] for k in ("method", "route", "path", "status")} == {
        "method": "GET",
        "route": "/api/v1/devices/{id}",
        "path": "/api/v1/devices/1",
        "status": 200,
    }
    assert found.__dict__["duration_ms"] >= 0
    assert logged["desk-2"].levelno == logging.INFO and logged["desk-2"].__dict__["status"] == 400
    # Scrapes, probes and WebSockets stay out of the journal at the default level.
    for quiet in ("scrape-1", "probe-1", "live-1"):
        assert logged[quiet].levelno == logging.DEBUG
    assert logged["live-1"].__dict__["status"] == 101
    everything = " ".join(str(value) for record in caplog.records for value in vars(record).values())
    assert secret not in everything
    assert all(token not in everything for token in api.tokens.values())
