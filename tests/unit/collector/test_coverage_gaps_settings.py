"""Collector settings checks: the redelivery schedule and the default database location."""

from __future__ import annotations

from pathlib import Path

import pytest

from micboard.collector.settings import CollectorSettings
from micboard.shared.errors import ConfigError
from micboard.shared.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in (
        "MICBOARD_DATABASE_URL",
        "MICBOARD_STATE_DIR",
        "MICBOARD_MAX_DELIVER",
        "MICBOARD_REDELIVERY_BACKOFF_S",
    ):
        monkeypatch.delenv(name, raising=False)


def test_non_positive_redelivery_delays_are_refused() -> None:
    for delays in ([0.0], [60.0, -1.0]):
        with pytest.raises(ConfigError) as info:
            load_settings(CollectorSettings, redelivery_backoff_s=delays)
        assert "redelivery_backoff_s must hold positive numbers" in str(info.value)


def test_max_deliver_must_exceed_the_schedule() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(CollectorSettings, redelivery_backoff_s=[1.0, 2.0], max_deliver=3)
    assert "max_deliver must be larger" in str(info.value)
    ok = load_settings(CollectorSettings, ack_wait_s=5.0, redelivery_backoff_s=[1.0, 2.0], max_deliver=4)
    assert ok.consumer_backoff_s() == [5.0, 1.0, 2.0]


def test_the_schedule_from_the_environment_takes_commas_and_errors_name_no_empty_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MICBOARD_REDELIVERY_BACKOFF_S", "60, 120")
    assert load_settings(CollectorSettings).redelivery_backoff_s == [60.0, 120.0]
    monkeypatch.setenv("MICBOARD_MAX_DELIVER", "3")
    with pytest.raises(ConfigError) as info:
        load_settings(CollectorSettings)
    # A check across fields: "invalid settings: Value error, max_deliver ...", not ": Value error".
    assert str(info.value).startswith("[config.invalid] invalid settings: Value error, max_deliver must be")


def test_database_url_defaults_to_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    settings = load_settings(CollectorSettings, state_dir=tmp_path / "state")
    expected = (tmp_path / "state").resolve() / "micboard.db"
    assert settings.resolved_database_url() == f"sqlite+aiosqlite:///{expected}"
    url = "postgresql+asyncpg://mb@db.example/micboard"
    assert load_settings(CollectorSettings, database_url=url).resolved_database_url() == url
