"""NATS client security edges: unusable client certificates, the TLS server name, plaintext URL lists."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from micboard.shared.errors import ConfigError
from micboard.shared.natsauth import NatsClientSecurity, connect_options, tls_context


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_client_certificate_that_does_not_load_is_a_config_error(tmp_path: Path) -> None:
    cert = secret(tmp_path / "client.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n")
    key = secret(tmp_path / "client.key", "not a key")
    with pytest.raises(ConfigError, match="cannot load the NATS client certificate") as caught:
        tls_context(NatsClientSecurity(tls_cert=cert, tls_key=key))
    assert "not a key" not in str(caught.value)  # the key's content is never quoted
    with pytest.raises(ConfigError, match="needs both nats_tls_cert and nats_tls_key"):
        tls_context(NatsClientSecurity(tls_cert=cert))


def test_a_world_readable_client_key_is_refused_before_it_is_read(tmp_path: Path) -> None:
    cert = secret(tmp_path / "client.pem", "x")
    key = secret(tmp_path / "client.key", "x")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        tls_context(NatsClientSecurity(tls_cert=cert, tls_key=key))


def test_tls_url_without_tls_settings_verifies_the_named_server() -> None:
    options = connect_options(
        "tls://nats-1.example:4222, tls://nats-2.example:4222",
        NatsClientSecurity(tls_hostname="nats.example", inbox_prefix="_INBOX_agent.hall.pi-1"),
    )
    context = options["tls"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert options["tls_hostname"] == "nats.example"
    assert options["inbox_prefix"] == "_INBOX_agent.hall.pi-1"
    assert "tls_handshake_first" not in options  # TLS when offered, not from the first byte


def test_plaintext_without_tls_settings_has_no_tls_context() -> None:
    assert connect_options("nats://127.0.0.1:4222", NatsClientSecurity()) == {}
    with pytest.raises(ConfigError, match="must be dot-separated tokens"):
        connect_options("nats://127.0.0.1:4222", NatsClientSecurity(inbox_prefix="bad prefix"))
