"""MICBOARD_NATS_SERVER_BIN: the collector's embedded nats-server binary, checked and used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from micboard.collector.app import Collector
from micboard.collector.preflight import CheckExit, check_nats
from micboard.collector.settings import CollectorSettings
from micboard.shared.errors import ErrorCode, NatsServerError
from micboard.shared.natsd import find_nats_server
from micboard.shared.settings import load_settings


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("MICBOARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_setting_is_read_from_the_environment_and_documented(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(CollectorSettings).nats_server_bin is None
    monkeypatch.setenv("MICBOARD_NATS_SERVER_BIN", "/opt/nats/nats-server")
    assert load_settings(CollectorSettings).nats_server_bin == Path("/opt/nats/nats-server")
    description = CollectorSettings.model_fields["nats_server_bin"].description or ""
    assert "PATH" in description and "nats-server-bin" in description


async def test_check_fails_on_a_configured_binary_that_does_not_exist(clean_env: Path) -> None:
    missing = clean_env / "nats-server"
    result = await check_nats(CollectorSettings(nats_server_bin=missing))
    assert not result.ok and result.exit_code is CheckExit.NATS_UNREACHABLE
    assert f"the configured nats-server binary {missing} does not exist" in result.detail


async def test_check_names_the_binary_the_embedded_server_runs(clean_env: Path) -> None:
    result = await check_nats(CollectorSettings(nats_server_bin=find_nats_server()))
    assert result.ok and str(find_nats_server()) in result.detail


async def test_the_collector_does_not_start_with_a_configured_binary_that_does_not_exist(
    clean_env: Path,
) -> None:
    missing = clean_env / "nats-server"
    collector = Collector(
        CollectorSettings(state_dir=clean_env / "state", nats_server_bin=missing, http_port=0)
    )
    with pytest.raises(NatsServerError) as info:
        await collector.start()
    assert info.value.code is ErrorCode.NATS_SERVER_NOT_FOUND and str(missing) in info.value.message
    assert collector.embedded is None
