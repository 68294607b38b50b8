"""Secret files (permission checks, safe writes), log redaction and the ``.env.example`` placeholders."""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

import pytest

from micboard.agent.settings import AgentSettings, load_agent_settings
from micboard.collector.settings import CollectorSettings
from micboard.shared import settings as shared_settings
from micboard.shared.errors import ConfigError
from micboard.shared.logs import JsonFormatter, KeyValueFormatter
from micboard.shared.redact import REDACTED, SecretRedactionFilter, redact_text, register_secret
from micboard.shared.secret_files import (
    check_config_file,
    check_secret_file,
    holds_secrets,
    write_secret_file,
)
from micboard.shared.settings import MicboardSettings

ROOT = Path(__file__).resolve().parents[3]
SEED = "SUAM" + "A" * 54  # shaped like an NKey user seed


def _file(tmp_path: Path, mode: int, text: str = "x\n") -> Path:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666])
def test_world_accessible_secret_file_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ConfigError, match="chmod 600"):
        check_secret_file(_file(tmp_path, mode), what="NKey seed file")


def test_group_readable_secret_file_is_allowed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        check_secret_file(_file(tmp_path, 0o640))
    assert "group-accessible" in caplog.text
    caplog.clear()
    check_secret_file(_file(tmp_path, 0o600))
    assert caplog.text == ""


def test_missing_or_odd_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        check_secret_file(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_secret_file(tmp_path)


def test_write_secret_file_creates_0600_in_a_0700_directory_atomically(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "seed.nk"
    write_secret_file(path, "first")
    write_secret_file(path, b"second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["seed.nk"]  # no temporary left behind


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("MICBOARD_SITE=hall\n", False),
        ("MICBOARD_NATS_NKEY_SEED_FILE=/etc/micboard/nats.nk\n", True),  # a name with SEED: checked
        ("MICBOARD_DATABASE_URL=\n", False),
        ("MICBOARD_DATABASE_URL=postgresql+asyncpg://mb:hunter2@db/micboard\n", True),
        ("MICBOARD_BOOTSTRAP_TOKEN=mbt_abc\n", True),
        ('webhook_secret = "k"\n', True),
        (f"seed = {SEED}\n", True),
    ],
)
def test_holds_secrets(text: str, secret: bool) -> None:
    assert holds_secrets(text) is secret


def test_config_file_with_secrets_must_not_be_world_readable(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o644, "MICBOARD_BOOTSTRAP_TOKEN=mbt_abcdef\n")
    with pytest.raises(ConfigError, match="holding secrets"):
        check_config_file(path)
    plain = _file(tmp_path, 0o644, "site = 'hall'\n")
    check_config_file(plain)
    check_config_file(tmp_path / "absent.env")  # nothing to check


def test_agent_refuses_a_world_readable_config_file_with_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "hall"\nnats_url = "tls://mb:hunter2@nats.example.org:4222"\n')
    config.chmod(0o644)
    with pytest.raises(ConfigError, match="agent config file holding secrets"):
        load_agent_settings(config)
    config.chmod(0o600)
    assert load_agent_settings(config).site == "hall"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"seed is {SEED} here", "seed is *** here"),
        ("postgresql+asyncpg://micboard:hunter2@db.example/micboard", "micboard:***@db.example"),
        ("Authorization: Bearer mbt_abcdefghijklmnop", "Bearer ***"),
        ("password=hunter2 next=1", "password=*** next=1"),
        ('{"api_key": "abc123"}', '"api_key": "***"'),
        ("jwt eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl end", "jwt *** end"),
        ("token mbt_Zp3x9Qw-Ab_cdEFgh1234567890abcdefgh reached", "token *** reached"),
    ],
)
def test_redact_text(text: str, kept: str) -> None:
    assert kept in redact_text(text)


def test_registered_secret_is_redacted_by_value() -> None:
    register_secret("mbt_registered-value-123")
    register_secret("short")  # too short to redact without mangling ordinary words
    assert redact_text("token mbt_registered-value-123 short") == f"token {REDACTED} short"


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"cannot connect to postgresql://u:{SEED}@db")
        except RuntimeError as error:
            exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()])
def test_filter_redacts_message_args_extras_and_tracebacks(formatter: logging.Formatter) -> None:
    record = _record(
        "connecting with %s",
        SEED,
        exc=True,
        token="mbt_secret_value_1",
        url="nats://u:pw123456@host",
        nats_nkey_seed_file="/etc/micboard/nats.nk",
        count=3,
    )
    assert SecretRedactionFilter().filter(record)
    line = formatter.format(record)
    assert SEED not in line and "mbt_secret_value_1" not in line and "pw123456" not in line
    assert "/etc/micboard/nats.nk" in line  # where a secret lives is not a secret
    assert "RuntimeError" in line and "count" in line


def test_env_example_holds_placeholders_only() -> None:
    text = (ROOT / ".env.example").read_text()
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if re.search(r"PASSWORD|SECRET|TOKEN|SEED(?!_FILE)|KEY(?!_FILE)", key):
            assert value in ("", "CHANGE_ME") or value.startswith("CHANGE_ME"), f"{key} has a value"
        assert "://" not in value or "@" not in value or "CHANGE_ME" in value, f"{key} has credentials"
    assert re.search(r"\bS[A-Z][A-Z2-7]{56}\b", text) is None
    assert "mbt_" not in text.replace("mbt_CHANGE_ME", "")


def test_the_collectors_own_secrets_are_redacted_by_value_once_it_starts() -> None:
    from micboard.collector.app import _register_secrets
    from micboard.collector.settings import CollectorSettings

    settings = CollectorSettings(
        database_url="postgresql+asyncpg://micboard:Plain-Pass-7f3a@db.example/micboard",
        bootstrap_token="admin-bootstrap-9Kq2",
    )
    _register_secrets(settings)
    # Even where no shape gives them away (a driver quoting the password alone, say).
    assert redact_text("auth failed with Plain-Pass-7f3a") == f"auth failed with {REDACTED}"
    assert redact_text("first token admin-bootstrap-9Kq2 in use") == f"first token {REDACTED} in use"


@pytest.mark.parametrize(
    ("program", "other"), [("AgentSettings", "CollectorSettings"), ("CollectorSettings", "AgentSettings")]
)
def test_a_world_readable_service_environment_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, other: str
) -> None:
    """The unit's EnvironmentFile is read by systemd, not by the program: it is checked by its path."""
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for name in ("AgentSettings", "CollectorSettings"):
        monkeypatch.setitem(shared_settings.SERVICE_ENV_FILES, name, tmp_path / f"{name}.env")
    mine = tmp_path / f"{program}.env"
    mine.write_text(f"MICBOARD_DATABASE_URL=postgresql://micboard:{SEED}@db/micboard\n")
    mine.chmod(0o644)
    theirs = tmp_path / f"{other}.env"
    theirs.write_text("MICBOARD_NATS_URL=nats://u:pw-of-the-other@h:4222\n")
    theirs.chmod(0o644)
    cls: type[MicboardSettings] = AgentSettings if program == "AgentSettings" else CollectorSettings
    values = {"site": "hall", "agent": "pi-1"} if cls is AgentSettings else {}
    with pytest.raises(
        ConfigError, match=r"service environment file holding secrets .* accessible to every user"
    ):
        shared_settings.build_settings(cls, **values)
    mine.chmod(0o600)  # what deploy/ writes; the other program's file is not this one's business
    assert isinstance(shared_settings.build_settings(cls, **values), cls)
