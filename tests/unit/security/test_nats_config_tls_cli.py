"""``micboard-collector nats-config`` with TLS: the server block written and the client settings hinted."""

from __future__ import annotations

from pathlib import Path

import pytest

from micboard.collector import cli


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_full_tls_writes_the_block_and_names_every_client_setting(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = state / "nats.conf"
    args = ["nats-config", "--out", str(config), "--tls-cert", "cert.pem", "--tls-key", "key.pem"]
    args += ["--tls-ca", "ca.pem", "--require-tls", "--verify-clients"]
    assert cli.main(args) == 0
    text = config.read_text()
    assert f'"{(state / "cert.pem").resolve()}"' in text and f'"{(state / "ca.pem").resolve()}"' in text
    assert "verify: true" in text and "handshake_first: true" in text
    out = capsys.readouterr().out  # with --out, the hints go to stdout
    assert f"nats-server configuration written: {config.resolve()}" in out
    assert "MICBOARD_NATS_TLS_CA=ca.pem" in out
    assert "MICBOARD_NATS_REQUIRE_TLS=true" in out
    assert "MICBOARD_NATS_TLS_CERT=/path/to/client-cert.pem" in out
    assert "MICBOARD_NATS_TLS_KEY=/path/to/client-key.pem" in out
    assert "MICBOARD_NATS_NKEY_SEED_FILE=" in out


def test_server_tls_only_hints_a_ca_placeholder(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nats-config", "--tls-cert", "cert.pem", "--tls-key", "key.pem"]) == 0
    printed = capsys.readouterr()
    assert "cert_file" in printed.out and "verify" not in printed.out  # the configuration on stdout
    assert "MICBOARD_NATS_TLS_CA=/path/to/ca.pem" in printed.err  # the hints on stderr
    assert "REQUIRE_TLS" not in printed.err and "TLS_CERT" not in printed.err


def test_tls_options_without_a_certificate_are_refused(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["nats-config", "--require-tls"]) == 2
    assert "give --tls-cert and --tls-key" in capsys.readouterr().err
