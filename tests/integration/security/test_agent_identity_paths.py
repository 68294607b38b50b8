"""The agent's NATS identity on every path of the agent, against a server that enforces it.

``run --demo-device`` connects with the same credentials and inbox prefix as the daemon, a
publish the server refuses is said loudly and carried in the heartbeat, not lost at DEBUG, and
the ``check`` command the docs give passes on a site with credentials and TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.integration.security.conftest import AGENT_A, AGENT_B, STREAM

from micboard.agent.daemon import AgentDaemon
from micboard.agent.publisher import EnvelopeFactory
from micboard.agent.runner import build_sender
from micboard.agent.settings import AgentSettings
from micboard.collector.ingest import check_event, ensure_stream
from micboard.collector.security.identities import NatsConfigOptions
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import MeterBody
from micboard.shared.model import ChannelMeter
from micboard.shared.natsd import EmbeddedNats

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from tests.integration.security.conftest import ClientFactory, SecureFleet, TlsMaterial

pytestmark = pytest.mark.timeout(60)

AGENT_BIN = Path(sys.executable).parent / "micboard-agent"
ROOT = Path(__file__).resolve().parents[3]
#: Where the docs tell the operator to run ``micboard-agent check`` with the service's settings.
DOCUMENTED_CHECKS = [
    "docs/DEPLOYMENT.md",
    "docs/OPERATIONS.md",
    "deploy/pi/README.md",
    "deploy/pi/install.sh",
]


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait until ``condition`` holds; a bound for what must come true, not a measure of speed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _collector_stream(
    clients: ClientFactory, server: EmbeddedNats, fleet: SecureFleet, tmp_path: Path
) -> JetStreamContext:
    settings = CollectorSettings(
        state_dir=tmp_path / "collector",
        nats_url=server.url,
        stream_name=STREAM,
        nats_nkey_seed_file=fleet.collector_seed,
        stream_replicas=1,
    )
    collector = await clients.connect(server.url, **collector_connect_options(settings, server.url))
    js = collector.nc.jetstream()
    await ensure_stream(js, settings)
    return js


async def test_run_demo_device_publishes_with_the_agents_credentials_and_inbox(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, clients: ClientFactory, tmp_path: Path
) -> None:
    # Without the agent's seed the server refuses the connection; without its inbox prefix the
    # JetStream acks never reach it. Either way nothing would be stored.
    js = await _collector_stream(clients, secure_nats, secure_fleet, tmp_path)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MICBOARD_")  # only what this test sets
    }
    env |= {
        "MICBOARD_SITE": AGENT_A[0],
        "MICBOARD_AGENT": AGENT_A[1],
        "MICBOARD_NATS_URL": secure_nats.url,
        "MICBOARD_NATS_NKEY_SEED_FILE": str(secure_fleet.seeds[AGENT_A]),
        "MICBOARD_STATE_DIR": str(tmp_path / "agent-state"),
        "MICBOARD_LOG_LEVEL": "WARNING",
    }
    agent = await asyncio.create_subprocess_exec(
        AGENT_BIN, "run", "--demo-device", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        sub = await js.pull_subscribe_bind("collector", stream=STREAM)
        msgs = await sub.fetch(2, timeout=15.0)
        kinds = []
        for msg in msgs:
            event = check_event(msg)
            assert (event.site, event.agent) == AGENT_A
            kinds.append(event.kind)
            await msg.ack()
        assert kinds == ["hello", "device"]
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _out, err = await agent.communicate()
    assert agent.returncode == 0, err.decode()
    assert b"Authorization" not in err and b"permissions violation" not in err.lower()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and "permissions violation" in str(getattr(record, "error", ""))
    ]


async def test_a_publish_the_server_refuses_is_an_error_once_and_in_the_heartbeat(
    secure_nats: EmbeddedNats, secure_fleet: SecureFleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Agent A's user may publish only under micboard.v1.hall.pi-1: a meter under pi-2's subject
    # (an agent whose site or agent name does not match its NATS identity) is refused by the
    # server, which says so asynchronously while the connection stays up.
    settings = AgentSettings(
        site=AGENT_A[0],
        agent=AGENT_A[1],
        nats_url=secure_nats.url,
        nats_nkey_seed_file=secure_fleet.seeds[AGENT_A],
        state_dir=tmp_path / "agent-state",
    )
    sender = build_sender(settings)
    caplog.set_level(logging.DEBUG, logger="micboard.agent.sender")
    await sender.start()
    try:
        await until(lambda: sender.stats.connected)
        nc = sender.nc
        assert nc is not None
        meter = MeterBody(device_key="rack-1", channels=(ChannelMeter(index=1, audio_dbfs=-20.0),))
        stranger = EnvelopeFactory(*AGENT_B)
        await sender.send(stranger.make(meter))
        await until(lambda: bool(_refusals(caplog)))
        denied = f'nats: permissions violation for publish to "micboard.v1.{AGENT_B[0]}.{AGENT_B[1]}.meter"'
        assert sender.stats.last_publish_error == denied
        # The same refusal again within 30 s is counted, not logged again; the server answers
        # a flush only after it has answered the publish before it.
        for _ in range(3):
            await sender.send(stranger.make(meter))
        await nc.flush(timeout=5)
        assert len(_refusals(caplog)) == 1
        assert AgentDaemon(settings, sender=sender).heartbeat().last_publish_error == denied
    finally:
        await sender.close(timeout_s=3.0)


def _documented_check(where: str, config_dir: Path, prefix: Path) -> str:
    """The shell script of the ``check`` command documented in ``where``, pointed at a test install."""
    scripts = [
        line.split("sh -c '", 1)[1].split("'", 1)[0]
        for line in (ROOT / where).read_text(encoding="utf-8").splitlines()
        if "micboard-agent check" in line and "sh -c '" in line
    ]
    assert len(scripts) == 1, f"{where}: {scripts}"
    script = scripts[0]
    assert "agent.env" in script
    for installed, here in (
        ("$CONFIG_DIR", config_dir), ("$PREFIX", prefix),  # install.sh prints its variables
        ("/etc/micboard", config_dir), ("/opt/micboard-agent", prefix),
    ):  # fmt: skip
        script = script.replace(installed, str(here))
    return script


@pytest.fixture
def tls_nats(secure_fleet: SecureFleet, tls_material: TlsMaterial, tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with the fleet's users that speaks TLS only, first byte on."""
    options = NatsConfigOptions(
        listen="127.0.0.1:4222",
        tls_cert=tls_material.server_cert,
        tls_key=tls_material.server_key,
        tls_ca=tls_material.ca,
        require_tls=True,
    )
    server = EmbeddedNats(store_dir=tmp_path / "nats-tls", config_file=secure_fleet.write_config(options))
    server.start()
    yield server
    server.cleanup()


def _install(tmp_path: Path, agent_env: str) -> tuple[Path, Path]:
    """A config directory with agent.toml and agent.env, and a prefix with bin/micboard-agent."""
    config_dir = tmp_path / "etc-micboard"
    config_dir.mkdir()
    (config_dir / "agent.toml").write_text(f'site = "{AGENT_A[0]}"\nagent = "{AGENT_A[1]}"\n')
    (config_dir / "agent.env").write_text(agent_env)
    for name in ("agent.toml", "agent.env"):
        (config_dir / name).chmod(0o600)
    prefix = tmp_path / "opt-micboard-agent"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "micboard-agent").symlink_to(AGENT_BIN)
    return config_dir, prefix


async def _sh(script: str, cwd: Path) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MICBOARD_")}
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", script, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.parametrize("where", DOCUMENTED_CHECKS)
async def test_the_documented_check_passes_on_a_site_with_credentials_and_tls(
    where: str, tls_nats: EmbeddedNats, secure_fleet: SecureFleet, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    # As DEPLOYMENT.md installs a secured agent: the NATS URL in agent.env, the seed and the CA
    # in /etc/micboard, handed to the service by its drop-in and not named in agent.env.
    config_dir, prefix = _install(
        tmp_path,
        f"MICBOARD_NATS_URL=tls://127.0.0.1:{tls_nats.port}\nMICBOARD_NATS_REQUIRE_TLS=true\n",
    )
    shutil.copyfile(secure_fleet.seeds[AGENT_A], config_dir / "nats.nk")
    shutil.copyfile(tls_material.ca, config_dir / "nats-ca.pem")
    (config_dir / "nats.nk").chmod(0o600)
    code, out = await _sh(_documented_check(where, config_dir, prefix), tmp_path)
    assert code == 0, out
    assert f"ok   nats: tls://127.0.0.1:{tls_nats.port} reachable" in out and "all checks passed" in out


@pytest.mark.parametrize("where", DOCUMENTED_CHECKS)
async def test_the_documented_check_passes_on_a_site_without_credentials(
    where: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    # No seed or CA installed (a demo or a closed network): the command must not name files
    # that are not there.
    config_dir, prefix = _install(tmp_path, f"MICBOARD_NATS_URL={nats_server.url}\n")
    code, out = await _sh(_documented_check(where, config_dir, prefix), tmp_path)
    assert code == 0, out
    assert f"ok   nats: {nats_server.url} reachable" in out
