"""Settings from the environment and structured logging."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from micboard.agent.settings import AgentSettings, load_agent_settings
from micboard.shared.errors import ConfigError
from micboard.shared.logs import JsonFormatter, KeyValueFormatter, configure_logging
from micboard.shared.settings import MicboardSettings, _listed, load_settings


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICBOARD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MICBOARD_NATS_URL", "nats://127.0.0.1:5")
    settings = load_settings(MicboardSettings)
    assert settings.log_level == "DEBUG" and settings.nats_url == "nats://127.0.0.1:5"


def test_bad_settings_are_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICBOARD_SITE", "Not A Token")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings)
    assert "site" in info.value.message and info.value.code.value == "config.invalid"


def test_agent_config_file_with_environment_winning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "hall"\nagent = "pi-9"\nheartbeat_interval_s = 2.5\n')
    monkeypatch.setenv("MICBOARD_AGENT", "pi-env")
    settings = load_agent_settings(config)
    assert (settings.site, settings.agent, settings.heartbeat_interval_s) == ("hall", "pi-env", 2.5)
    assert load_agent_settings(None).site == "demo"


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read"), ("site = [", "not valid TOML")])
def test_agent_config_file_errors(tmp_path: Path, content: str | None, message: str) -> None:
    config = tmp_path / "agent.toml"
    if content is not None:
        config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_agent_settings(config)


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "micboard.test", "levelname": "INFO", "msg": msg})
    record.__dict__.update(extra)
    return record


def test_key_value_lines() -> None:
    line = KeyValueFormatter().format(_record("device offline", device="dev 1", seq=3, empty=""))
    assert "\n" not in line
    assert 'msg="device offline"' in line and 'device="dev 1"' in line and "seq=3" in line
    assert 'empty=""' in line and "level=info" in line and "logger=micboard.test" in line


def test_json_lines_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("failed", code="x")
        record.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(record))
    assert data["msg"] == "failed" and data["code"] == "x" and "ValueError: boom" in data["exc"]
    assert "exc=" in KeyValueFormatter().format(record)


def test_configure_logging_installs_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging("WARNING", "json")
        configure_logging("INFO", "kv")
        assert len(root.handlers) == 1 and root.level == logging.INFO
        logging.getLogger("micboard.x").info("hello", extra={"k": "v"})
        assert "msg=hello k=v" in capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


_ITEM = st.text(
    alphabet=st.characters(exclude_characters=",[", exclude_categories=["Cs"]), min_size=1, max_size=20
).filter(lambda s: s.strip() != "")


@given(st.lists(_ITEM, max_size=6))
def test_a_list_setting_reads_commas_and_json_alike(items: list[str]) -> None:
    # What an environment variable holds: "a, b" or the JSON form; never an exception but ValueError.
    assert _listed(", ".join(items)) == [item.strip() for item in items]
    assert _listed(json.dumps(items)) == items
    assert _listed(items) is items  # a list from a config file is left to validation


@given(st.text(max_size=40))
def test_any_text_is_a_list_or_a_clear_error(text: str) -> None:
    try:
        value = _listed(text)
    except ValueError as exc:
        assert "not a JSON list" in str(exc)
    else:
        assert isinstance(value, list)  # "[..." is a JSON array or an error; the rest splits
