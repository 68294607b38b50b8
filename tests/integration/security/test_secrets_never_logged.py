"""A full run with real identities and tokens: no seed or token appears in any log or CLI output.

Provisioning through the CLI, a nats-server with the generated configuration (its own log at
trace level too), a collector with a bootstrap API token on SQLite and on PostgreSQL with a
password in its URL, a webhook with a signing secret that receives an alert, an agent publishing
with its NKey, API calls with a good token, a bad token and a token in the query string, a token
created through the API. Every log record of every logger is captured at DEBUG *without* the redaction filter,
so the test proves the code does not log secrets, rather than that the filter hides them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy.engine import make_url

from micboard.agent.natsauth import agent_connect_options
from micboard.agent.publisher import EnvelopeFactory, JetStreamPublisher, connect
from micboard.agent.settings import AgentSettings
from micboard.collector import cli
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import DeviceBody, HelloBody
from micboard.shared.logs import KeyValueFormatter
from micboard.shared.model import Device, Family, ReceiverChannel, Transmitter, Vendor
from micboard.shared.natsd import EmbeddedNats
from micboard.shared.settings import load_settings

pytestmark = pytest.mark.timeout(60)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(KeyValueFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def all_logs() -> Iterator[_Capture]:
    """Every record of every logger at DEBUG, rendered by micboard's formatter."""
    capture = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(old_level)


class _WebhookReceiver:
    """A local HTTP endpoint that records the webhook deliveries it receives."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _receive(self, request: web.Request) -> web.Response:
        self.deliveries.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return web.Response(status=204)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> tuple[str | None, str | None]:
    """``(database URL, its password)``: SQLite in the state directory, or PostgreSQL with a password."""
    if request.param == "sqlite":
        return None, None
    password = f"pw-{secrets.token_urlsafe(18)}"
    # The test server trusts local connections, so the password is carried but never checked.
    url = make_url(request.getfixturevalue("pg_url")).set(password=password)
    return url.render_as_string(hide_password=False), password


async def test_a_full_run_logs_no_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    all_logs: _Capture,
    database: tuple[str | None, str | None],
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(state))
    database_url, database_password = database
    if database_url is not None:
        monkeypatch.setenv("MICBOARD_DATABASE_URL", database_url)
    monkeypatch.chdir(tmp_path)  # no stray .env from the working tree
    # The commands keep this test's capture (no redaction) instead of installing their own handler.
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)
    config = tmp_path / "nats-server.conf"
    agent_seed = tmp_path / "agent.nk"
    receiver = _WebhookReceiver()
    await receiver.start()
    webhook_secret = f"whs-{secrets.token_urlsafe(24)}"
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(webhook_secret)
    secret_file.chmod(0o600)
    assert cli.main(["nats-config", "--out", str(config), "--listen", "127.0.0.1:4222"]) == 0
    assert cli.main(["agent", "add", "hall", "pi-1", "--seed-out", str(agent_seed)]) == 0
    # These two run an event loop of their own, so not on this one.
    assert await asyncio.to_thread(cli.main, ["migrate"]) == 0
    assert (
        await asyncio.to_thread(cli.main, ["webhook", "add", receiver.url, "--secret-file", str(secret_file)])
        == 0
    )
    cli_output = capsys.readouterr()
    assert "MICBOARD_NATS_NKEY_SEED_FILE=" in cli_output.out
    collector_seed = state / "security" / "collector.nk"
    secret_values = {
        "collector seed": collector_seed.read_text().strip(),
        "agent seed": agent_seed.read_text().strip(),
        "bootstrap token": f"mbt_{secrets.token_urlsafe(32)}",
        "wrong token": f"mbt_{secrets.token_urlsafe(32)}",
        "query token": f"mbt_{secrets.token_urlsafe(32)}",
        "webhook secret": webhook_secret,
    }
    if database_password is not None:
        secret_values["database password"] = database_password

    server = EmbeddedNats(store_dir=tmp_path / "nats-store", config_file=config, extra_args=["-DV"])
    server.start()
    try:
        settings = load_settings(
            CollectorSettings,
            state_dir=state,
            nats_url=server.url,
            nats_nkey_seed_file=collector_seed,
            http_port=0,
            bootstrap_token=secret_values["bootstrap token"],
            fetch_timeout_s=0.2,
        )
        collector = Collector(settings)
        running = await collector.start()
        try:
            agent_settings = AgentSettings(
                site="hall", agent="pi-1", nats_url=server.url, nats_nkey_seed_file=agent_seed
            )
            nc = await connect(server.url, name="agent", **agent_connect_options(agent_settings))
            try:
                factory = EnvelopeFactory("hall", "pi-1")
                publisher = JetStreamPublisher(nc, timeout_s=3.0)
                assert await publisher.publish(factory.make(HelloBody(version="1", hostname="pi", config={})))
                # A transmitter nearly flat: an alert opens and the webhook is called, signed.
                assert await publisher.publish(
                    factory.make(DeviceBody(device_key="rx-1", snapshot=_flat_receiver()))
                )
            finally:
                await nc.close()
            secret_values["created token"] = await _use_the_api(running.url, secret_values)
            await asyncio.wait_for(receiver.arrived.wait(), 10)
        finally:
            await collector.stop()
    finally:
        server.stop()
        await receiver.stop()
    headers, body = receiver.deliveries[0]
    assert b"alert.opened" in body and "X-Micboard-Signature" in headers

    sources = {
        "python logs": "\n".join(all_logs.lines),
        "CLI stdout": cli_output.out,
        "CLI stderr": cli_output.err,
        "nats-server log": server.log_file.read_text(errors="replace"),
        "fleet registry": (state / "security" / "fleet.json").read_text(),
        "nats-server config": config.read_text(),
    }
    assert len(all_logs.lines) > 10 and "collector ready" in sources["python logs"]
    # The collector did all it does (stream, consumer, acks, meters) within its permissions.
    assert "permissions violation" not in sources["python logs"].lower()
    assert "Permissions Violation" not in sources["nats-server log"]
    for source, text in sources.items():
        for name, value in secret_values.items():
            assert value not in text, f"{name} found in {source}"


def _flat_receiver() -> Device:
    channel = ReceiverChannel(
        index=1, name="HH01 Ana", transmitter=Transmitter(battery_percent=3, battery_bars=1)
    )
    return Device(
        device_key="rx-1", vendor=Vendor.SHURE, family=Family.ULXD, model="ULXD4", channels=(channel,)
    )


async def _use_the_api(base: str, secret_values: dict[str, str]) -> str:
    good = {"Authorization": f"Bearer {secret_values['bootstrap token']}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # until ingest has applied the agent's hello
            async with http.get(f"{base}/api/v1/agents", headers=good) as response:
                assert response.status == 200
                if "pi-1" in await response.text():
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the agent's hello never reached the API")
        bad = {"Authorization": f"Bearer {secret_values['wrong token']}"}
        async with http.get(f"{base}/api/v1/agents", headers=bad) as response:
            assert response.status == 401
        async with http.get(f"{base}/api/v1/agents?token={secret_values['query token']}") as response:
            assert response.status == 401
        async with http.post(
            f"{base}/api/v1/tokens", headers=good, json={"name": "desk", "role": "viewer"}
        ) as response:
            assert response.status in (200, 201)
            created: str = (await response.json())["token"]
    return created
