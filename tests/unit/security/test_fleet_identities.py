"""Fleet registry, generated nats-server configuration, the CLI commands and client connect options."""

from __future__ import annotations

import json
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from micboard.agent.natsauth import agent_connect_options, command_allowed
from micboard.agent.settings import AgentSettings
from micboard.collector import cli
from micboard.collector.security.identities import Fleet, NatsConfigOptions, public_key_of
from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.security.natsconf import agent_permissions, collector_permissions, render_config
from micboard.collector.settings import CollectorSettings
from micboard.shared.envelope import CommandAction, CommandBody, CommandEvent, HelloBody, HelloEvent
from micboard.shared.errors import ConfigError, SubjectError
from micboard.shared.natsauth import NatsClientSecurity, agent_inbox_prefix, check_urls, connect_options
from micboard.shared.natsd import find_nats_server


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_agent_permissions_allow_only_its_own_subjects_and_inbox() -> None:
    perms = agent_permissions("hall", "pi-1")
    allowed = perms["publish"]["allow"]
    assert all(s.startswith("micboard.v1.hall.pi-1.") for s in allowed)
    assert "micboard.v1.hall.pi-1.cmd" not in allowed
    assert not any(s.startswith("$JS") or ">" in s or "*" in s for s in allowed)
    assert perms["subscribe"]["allow"] == ["micboard.v1.hall.pi-1.cmd", "_INBOX_agent.hall.pi-1.>"]
    assert perms["allow_responses"] == {"max": 1, "expires": "1m"}


def test_inbox_prefixes_of_different_agents_never_overlap() -> None:
    # With one token per part, "a"/"b_c" and "a_b"/"c" cannot share a prefix.
    assert agent_inbox_prefix("a", "b_c") != agent_inbox_prefix("a_b", "c")
    with pytest.raises(SubjectError):
        agent_inbox_prefix("hall", "pi.1")


def test_collector_permissions_are_scoped_to_its_stream() -> None:
    perms = collector_permissions("EVENTS")
    live = "micboard.live.v1.*"
    published = perms["publish"]["allow"]
    assert "micboard.v1.*.*.cmd" in published
    assert all(
        s.startswith(("$JS.API.INFO", "micboard.v1")) or ".EVENTS" in s for s in published if s != live
    )
    assert not any("DELETE" in s or "PURGE" in s for s in published)
    assert "_INBOX_collector.>" in perms["subscribe"]["allow"]
    # The live bridge: collector processes talk to each other there, both ways.
    assert live in published and live in perms["subscribe"]["allow"]


def test_registry_add_rotate_revoke(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    registry = fleet.load()
    collector = fleet.ensure_collector(registry)
    assert fleet.ensure_collector(registry) is collector  # created once
    first = fleet.add_agent(registry, "hall", "pi-1")
    assert public_key_of(first.seed_file.read_bytes().strip()) == first.identity.public_key
    with pytest.raises(ConfigError, match="--rotate"):
        fleet.add_agent(registry, "hall", "pi-1")
    second = fleet.add_agent(registry, "hall", "pi-1", rotate=True)
    assert second.identity.public_key != first.identity.public_key
    assert [a.public_key for a in registry.active_agents()] == [second.identity.public_key]
    fleet.save(registry)
    assert _mode(fleet.registry_path) == 0o600 and _mode(fleet.collector_seed_path) == 0o600
    loaded = fleet.load()
    assert loaded.model_dump() == registry.model_dump()
    fleet.check_collector_seed(loaded)
    revoked = fleet.revoke_agent(loaded, "hall", "pi-1")
    assert revoked.revoked is not None and not second.seed_file.exists()
    assert loaded.active_agents() == [] and len(loaded.agents) == 2  # kept as an audit trail
    with pytest.raises(ConfigError, match="no active identity"):
        fleet.revoke_agent(loaded, "hall", "pi-1")


def test_registry_refuses_a_lost_collector_seed_and_a_world_readable_registry(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    registry = fleet.load()
    fleet.ensure_collector(registry)
    fleet.save(registry)
    fleet.registry_path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        fleet.load()
    fleet.registry_path.chmod(0o600)
    fleet.collector_seed_path.unlink()
    with pytest.raises(ConfigError, match="missing"):
        fleet.ensure_collector(fleet.load())
    fleet.registry_path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        fleet.load()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (NatsConfigOptions(require_tls=True), "server certificate"),
        (NatsConfigOptions(tls_cert=Path("c.pem")), "both --tls-cert and --tls-key"),
        (NatsConfigOptions(tls_cert=Path("c.pem"), tls_key=Path("k.pem"), verify_clients=True), "--tls-ca"),
    ],
)
def test_render_refuses_incomplete_tls(tmp_path: Path, options: NatsConfigOptions, message: str) -> None:
    fleet = Fleet(tmp_path)
    registry = fleet.load()
    fleet.ensure_collector(registry)
    with pytest.raises(ConfigError, match=message):
        render_config(registry, options, "MICBOARD")


def test_rendered_configuration_is_valid_for_nats_server(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    registry = fleet.load()
    with pytest.raises(ConfigError, match="no collector"):
        render_config(registry, NatsConfigOptions(), "MICBOARD")
    fleet.ensure_collector(registry)
    fleet.add_agent(registry, "hall", "pi-1")
    revoked = fleet.add_agent(registry, "annex", "pi-9")
    fleet.revoke_agent(registry, "annex", "pi-9")
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    options = NatsConfigOptions(
        store_dir=tmp_path / "js", tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem",
        tls_ca=tmp_path / "ca.pem", require_tls=True, verify_clients=True,
    )  # fmt: skip
    text = render_config(registry, options, "MICBOARD")
    assert revoked.identity.public_key not in text
    assert "handshake_first: true" in text and "verify: true" in text
    config = tmp_path / "nats.conf"
    config.write_text(render_config(registry, NatsConfigOptions(store_dir=tmp_path / "js"), "MICBOARD"))
    check = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("listen", ["not a listen", "4222", ":4222", "host:", "host:99999", "my host:4222"])
def test_a_listen_address_that_is_no_host_and_port_is_a_usage_error(
    listen: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(SystemExit) as info:
        cli.main(["nats-config", "--listen", listen])
    assert info.value.code == 2 and "is not host:port" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # nothing written


def test_cli_nats_config_and_agent_lifecycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["nats-config"]) == 0  # printed, not written
    printed = capsys.readouterr()
    assert "accounts: {" in printed.out and "MICBOARD_NATS_NKEY_SEED_FILE" in printed.err
    assert cli.main(["agent", "add", "hall", "pi-1"]) == 0
    assert "run `micboard-collector nats-config --out FILE`" in capsys.readouterr().out

    config = tmp_path / "nats.conf"
    assert cli.main(["nats-config", "--out", str(config)]) == 0
    assert _mode(config) == 0o640
    capsys.readouterr()
    assert cli.main(["agent", "add", "annex", "pi-2", "--nats-url", "tls://nats.test:4222"]) == 0
    out = capsys.readouterr().out
    seed_file = tmp_path / "state" / "security" / "agents" / "annex.pi-2.nk"
    assert seed_file.read_text().strip() not in out  # the seed is never printed
    assert "MICBOARD_NATS_INBOX_PREFIX=_INBOX_agent.annex.pi-2" in out and "regenerated" in out
    assert "micboard.v1.annex.pi-2.hello" in config.read_text()

    assert cli.main(["agent", "list"]) == 0
    assert capsys.readouterr().out.count("active") == 2
    assert cli.main(["agent", "revoke", "annex", "pi-2"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert "annex.pi-2" not in config.read_text()
    assert cli.main(["agent", "list", "--all"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli.main(["agent", "revoke", "annex", "pi-2"]) == 2
    assert "no active identity" in capsys.readouterr().err


def _seed_file(tmp_path: Path, mode: int = 0o600) -> Path:
    fleet = Fleet(tmp_path / "fleet")
    registry = fleet.load()
    seed = fleet.add_agent(registry, "hall", "pi-1").seed_file
    seed.chmod(mode)
    return seed


def test_agent_connect_options(tmp_path: Path) -> None:
    seed = _seed_file(tmp_path)
    settings = AgentSettings(
        site="hall", agent="pi-1", nats_url="nats://127.0.0.1:1", nats_nkey_seed_file=seed
    )
    options = agent_connect_options(settings)
    assert options == {
        "nkeys_seed": str(seed),
        "inbox_prefix": "_INBOX_agent.hall.pi-1",
        "ping_interval": 10.0,
        "max_outstanding_pings": 3,
    }
    seed.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        agent_connect_options(settings)


def test_collector_connect_options_with_tls(tmp_path: Path) -> None:
    settings = CollectorSettings(nats_require_tls=True)
    options = collector_connect_options(settings, "tls://127.0.0.1:4222")
    assert isinstance(options["tls"], ssl.SSLContext) and options["tls_handshake_first"] is True
    assert options["tls"].check_hostname and options["tls"].verify_mode is ssl.CERT_REQUIRED
    assert options["inbox_prefix"] == "_INBOX_collector"
    with pytest.raises(ConfigError, match="plaintext"):
        collector_connect_options(settings, "tls://a:1,nats://user:pw@b:2")


@pytest.mark.parametrize(
    ("security", "message"),
    [
        (NatsClientSecurity(inbox_prefix="_INBOX.>"), "dot-separated"),
        (NatsClientSecurity(tls_cert=Path("c.pem")), "both nats_tls_cert and nats_tls_key"),
        (NatsClientSecurity(tls_ca=Path("/nonexistent/ca.pem")), "cannot load the NATS CA"),
    ],
)
def test_connect_options_refuse_bad_settings(security: NatsClientSecurity, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        connect_options("nats://127.0.0.1:4222", security)


def test_seed_file_must_hold_a_user_seed_and_not_both_kinds_of_credentials(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.nk"
    wrong.write_text("hunter2-not-a-seed\n")
    wrong.chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold an NKey user seed") as info:
        connect_options("nats://h:1", NatsClientSecurity(nkey_seed_file=wrong))
    assert "hunter2" not in str(info.value)
    seed = _seed_file(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        connect_options("nats://h:1", NatsClientSecurity(nkey_seed_file=seed, creds_file=seed))
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    creds.chmod(0o600)
    assert connect_options("nats://h:1", NatsClientSecurity(creds_file=creds)) == {
        "user_credentials": str(creds)
    }


def test_check_urls() -> None:
    assert check_urls("nats://a:1, tls://b:2", require_tls=False) == ["nats://a:1", "tls://b:2"]
    with pytest.raises(ConfigError, match="scheme"):
        check_urls("http://a:1", require_tls=False)
    with pytest.raises(ConfigError, match="no NATS server"):
        check_urls(" , ", require_tls=False)
    with pytest.raises(ConfigError, match="plaintext") as info:
        check_urls("nats://user:s3cret@a:1", require_tls=True)
    assert "s3cret" not in str(info.value)


def test_command_allowed_only_for_this_agent_on_its_subject() -> None:
    body = CommandBody(request_id="r", action=CommandAction.IDENTIFY)
    command = CommandEvent(site="hall", agent="pi-1", boot="0123456789abcdef", seq=0, ts=1, body=body)
    assert command_allowed(command, "hall", "pi-1", subject="micboard.v1.hall.pi-1.cmd")
    assert command_allowed(command, "hall", "pi-1")
    assert not command_allowed(command, "hall", "pi-2")
    assert not command_allowed(command, "annex", "pi-1")
    assert not command_allowed(command, "hall", "pi-1", subject="micboard.v1.hall.pi-2.cmd")
    hello = HelloEvent(
        site="hall", agent="pi-1", boot="0123456789abcdef", seq=1, ts=1,
        body=HelloBody(version="1", hostname="h", config={}),
    )  # fmt: skip
    assert not command_allowed(hello, "hall", "pi-1")


def test_registry_file_is_json_with_public_keys_only(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    registry = fleet.load()
    fleet.ensure_collector(registry)
    provisioned = fleet.add_agent(registry, "hall", "pi-1")
    fleet.save(registry)
    data = json.loads(fleet.registry_path.read_text())
    assert data["agents"][0]["public_key"].startswith("U")
    assert provisioned.seed_file.read_text().strip() not in fleet.registry_path.read_text()
