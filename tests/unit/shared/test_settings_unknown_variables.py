"""A ``MICBOARD_*`` variable that names no setting is logged as a warning, naming the setting meant."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import pytest

from micboard.agent.settings import AgentSettings, load_agent_settings
from micboard.collector.settings import CollectorSettings
from micboard.shared.errors import ConfigError
from micboard.shared.settings import NOT_SETTINGS, MicboardSettings, load_settings

ROOT = Path(__file__).resolve().parents[3]
LOGGER = "micboard.shared.settings"

#: Where ``MICBOARD_*`` variables are set or read outside the settings classes.
_USERS = [
    ROOT / "tasks.py",
    ROOT / "README.md",
    ROOT / ".env.example",
    *(ROOT / name for name in ("systemd", "deploy", "docs", ".ci", ".github", "scripts", "bench", "tests")),
]
_VARIABLE = re.compile(r"\bMICBOARD_[A-Z0-9_]*[A-Z0-9]\b")


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Path:
    """No ``MICBOARD_*`` variable but the test's own, no ``.env``, and the loader's warnings captured."""
    for name in list(os.environ):
        if name.upper().startswith("MICBOARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # a .env in the directory the tests run from is not read
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return tmp_path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_misspelt_agent_variable_is_named_with_the_setting_meant(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MICBOARD_NATS_ULR", "nats://nats.example.net:4222")
    monkeypatch.setenv("MICBOARD_SITE", "hall")
    settings = load_agent_settings()
    assert _warnings(caplog) == ["unknown setting MICBOARD_NATS_ULR ignored; did you mean MICBOARD_NATS_URL?"]
    # Warned, not refused: the rest of the settings load as before.
    assert settings.nats_url is None and settings.site == "hall"


def test_a_misspelt_collector_variable_is_named_with_the_setting_meant(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MICBOARD_HTTP_PROT", "9000")
    monkeypatch.setenv("MICBOARD_RECORD_RETENTION_DAYS", "7")
    settings = load_settings(CollectorSettings)
    assert _warnings(caplog) == [
        "unknown setting MICBOARD_HTTP_PROT ignored; did you mean MICBOARD_HTTP_PORT?",
        "unknown setting MICBOARD_RECORD_RETENTION_DAYS ignored; "
        "did you mean MICBOARD_RECORDS_RETENTION_DAYS?",
    ]
    assert settings.http_port == 8080 and settings.records_retention_days == 90


def test_a_name_like_no_setting_is_named_without_a_suggestion(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MICBOARD_XYZZY", "1")
    load_agent_settings()
    assert _warnings(caplog) == ["unknown setting MICBOARD_XYZZY ignored"]


def test_names_are_matched_without_regard_to_case_as_the_settings_read_them(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("micboard_agent", "pi-7")  # read by the settings: no warning
    monkeypatch.setenv("Micboard_Sitte", "hall")  # named as written
    assert load_agent_settings().agent == "pi-7"
    assert _warnings(caplog) == ["unknown setting Micboard_Sitte ignored; did you mean MICBOARD_SITE?"]


@pytest.mark.parametrize("cls", [AgentSettings, CollectorSettings])
def test_settings_and_variables_read_elsewhere_are_not_warned_about(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cls: type[MicboardSettings],
) -> None:
    for name in NOT_SETTINGS:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("MICBOARD_LOG_LEVEL", "DEBUG")  # a setting of both programs
    monkeypatch.setenv("MICBOARD_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("NATS_ULR", "x")  # not ours: no prefix
    monkeypatch.setenv("MICBOARDX_SITE", "x")
    settings = load_settings(cls)
    assert settings.log_level == "DEBUG" and settings.nats_url == "nats://127.0.0.1:4222"
    assert _warnings(caplog) == []
    # Every setting of the program, by its documented name. Empty values do not validate for
    # most of them; the warnings come before validation and must name none of them.
    caplog.clear()
    for field in cls.model_fields:
        monkeypatch.setenv(f"MICBOARD_{field.upper()}", "")
    with contextlib.suppress(ConfigError):
        load_settings(cls)
    assert _warnings(caplog) == []


def test_a_nested_setting_is_named_by_its_field(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # MICBOARD_<FIELD>__<KEY> is how pydantic-settings sets part of a structured setting.
    monkeypatch.setenv("MICBOARD_STATIC_DEVICES__0__ADDRESS", "10.0.0.5")
    monkeypatch.setenv("MICBOARD_STATIC_DEVICE__0__ADDRESS", "10.0.0.5")
    with pytest.raises(ConfigError, match="static_devices"):
        load_agent_settings()  # a list is given as JSON; validation says so, naming the field
    assert _warnings(caplog) == [
        "unknown setting MICBOARD_STATIC_DEVICE__0__ADDRESS ignored; did you mean MICBOARD_STATIC_DEVICES?"
    ]


def test_the_other_programs_variables_are_not_unknown(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One environment for both programs (the demo, a .env made from .env.example): each reads
    # its own and leaves the other's alone, without a warning; a misspelling still gets one.
    monkeypatch.setenv("MICBOARD_SITE", "hall")  # the agent's
    monkeypatch.setenv("MICBOARD_HTTP_PORT", "9000")  # the collector's
    monkeypatch.setenv("MICBOARD_HTTP_PROT", "9001")
    assert load_agent_settings().site == "hall"
    assert _warnings(caplog) == [
        "unknown setting MICBOARD_HTTP_PROT ignored; did you mean MICBOARD_HTTP_PORT?"
    ]
    caplog.clear()
    assert load_settings(CollectorSettings).http_port == 9000
    assert _warnings(caplog) == [
        "unknown setting MICBOARD_HTTP_PROT ignored; did you mean MICBOARD_HTTP_PORT?"
    ]


def test_one_warning_per_load_with_an_agent_config_file(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With a config file the agent's settings are built twice; the warning is given once.
    config = clean_env / "agent.toml"
    config.write_text('site = "hall"\n')
    monkeypatch.setenv("MICBOARD_NATS_ULR", "nats://nats.example.net:4222")
    monkeypatch.setenv("MICBOARD_AGENT", "pi-env")
    settings = load_agent_settings(config)
    assert (settings.site, settings.agent) == ("hall", "pi-env")
    assert _warnings(caplog) == ["unknown setting MICBOARD_NATS_ULR ignored; did you mean MICBOARD_NATS_URL?"]
    caplog.clear()
    load_agent_settings(config)
    assert len(_warnings(caplog)) == 1  # and again at the next load


def test_a_misspelt_name_in_the_env_file_is_warned_about_once(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (clean_env / ".env").write_text(
        "MICBOARD_NATS_URL=nats://nats.example.net:4222\nMICBOARD_NATS_ULR=nats://x:4222\nMICBOARD_STAT_DIR=/x\n"
    )
    monkeypatch.setenv("MICBOARD_NATS_ULR", "nats://x:4222")  # in both: one line
    settings = load_settings(CollectorSettings)
    assert settings.nats_url == "nats://nats.example.net:4222"
    assert _warnings(caplog) == [
        "unknown setting MICBOARD_NATS_ULR ignored; did you mean MICBOARD_NATS_URL?",
        "unknown setting MICBOARD_STAT_DIR ignored; did you mean MICBOARD_STATE_DIR?",
    ]


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return [p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


def test_every_variable_used_outside_the_settings_is_a_setting_or_listed() -> None:
    """A ``MICBOARD_*`` name a script, unit, doc, CI file or test uses is a setting or in NOT_SETTINGS.

    A new such name (a test's server, an install option) would otherwise be called an unknown
    setting in every program's log wherever it is set.
    """
    settings = {
        f"MICBOARD_{name.upper()}" for name in (*AgentSettings.model_fields, *CollectorSettings.model_fields)
    }
    this_file = Path(__file__).resolve()
    problems = []
    for root in _USERS:
        for path in _files(root):
            if path.resolve() == this_file:
                continue  # its misspellings are on purpose
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary files name no variable
            for name in sorted(set(_VARIABLE.findall(text))):
                if name.split("__", 1)[0] not in settings and name not in NOT_SETTINGS:
                    problems.append(f"{path.relative_to(ROOT)}: {name}")
    assert not problems, "add to NOT_SETTINGS or make settings:\n" + "\n".join(problems)
