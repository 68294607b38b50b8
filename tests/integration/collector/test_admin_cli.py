"""``micboard-collector thresholds`` and ``webhook``: alert configuration from the command line."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from micboard.collector.cli import main as collector_main
from micboard.collector.services.alerts import AlertService
from micboard.collector.store.database import create_engine
from micboard.collector.store.schema_alerts import webhooks


@pytest.fixture
def cli_db(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MICBOARD_DATABASE_URL", db_url)
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MICBOARD_AUTO_MIGRATE", "always")
    return db_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = collector_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def thresholds_in_force(url: str, site: str) -> dict[str, object]:
    async def read() -> dict[str, object]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return (await AlertService(engine).thresholds_for(conn, site)).model_dump()
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_thresholds_set_show_and_reset(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "thresholds", "set", "main-hall", "battery_replace_percent=30", "clip_dbfs=-0.5"
    )
    assert code == 0 and '"battery_replace_percent": 30' in out
    in_force = thresholds_in_force(cli_db, "main-hall")
    assert in_force["battery_replace_percent"] == 30 and in_force["clip_dbfs"] == -0.5
    assert thresholds_in_force(cli_db, "other")["battery_replace_percent"] == 25  # defaults elsewhere

    code, out, _ = run(capsys, "thresholds", "show", "main-hall")
    shown = json.loads(out)
    assert code == 0
    assert shown["overrides"] == {"battery_replace_percent": 30, "clip_dbfs": -0.5}
    assert shown["in_force"]["battery_replace_percent"] == 30 and shown["in_force"]["rf_loss_s"] == 3.0
    code, out, _ = run(capsys, "thresholds", "show")
    assert code == 0 and json.loads(out)["sites"] == {"main-hall": shown["overrides"]}

    # A second set merges with what the site already overrides.
    assert run(capsys, "thresholds", "set", "main-hall", "rf_loss_s=5")[0] == 0
    assert thresholds_in_force(cli_db, "main-hall")["battery_replace_percent"] == 30

    code, out, _ = run(capsys, "thresholds", "reset", "main-hall", "clip_dbfs", "rf_loss_s")
    assert code == 0 and "overrides now" in out
    assert thresholds_in_force(cli_db, "main-hall")["clip_dbfs"] == -1.0
    code, _, err = run(capsys, "thresholds", "reset", "main-hall", "clip_dbfs")
    assert code == 2 and "does not override clip_dbfs" in err
    code, out, _ = run(capsys, "thresholds", "reset", "main-hall")
    assert code == 0 and out.strip().endswith("defaults")
    assert thresholds_in_force(cli_db, "main-hall")["battery_replace_percent"] == 25
    assert "has no overrides" in run(capsys, "thresholds", "reset", "main-hall")[1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["battery_critical_percent=60"], "must not exceed"),
        (["batery_replace_percent=30"], "unknown threshold 'batery_replace_percent'"),
        (["rf_loss_s=soon"], "is not a number"),
        (["rf_loss_s"], "is not FIELD=VALUE"),
        (["rf_min_dbm=20"], "invalid thresholds"),
    ],
)
def test_bad_thresholds_are_refused_and_nothing_is_stored(
    cli_db: str, capsys: pytest.CaptureFixture[str], values: list[str], message: str
) -> None:
    code, _, err = run(capsys, "thresholds", "set", "main-hall", *values)
    assert code == 2 and message in err
    code, out, _ = run(capsys, "thresholds", "show")
    assert code == 0 and json.loads(out)["sites"] == {}


def test_a_bad_site_name_is_refused(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "thresholds", "set", "Main Hall", "rf_loss_s=5")
    assert code == 2 and "site" in err


def test_webhook_add_list_toggle_remove(
    cli_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text("a-long-random-secret-0123456789\n")
    secret_file.chmod(0o600)
    code, out, _ = run(
        capsys, "webhook", "add", "https://ops.example.org/hook", "--secret-file", str(secret_file),
        "--event", "alert.opened", "--event", "alert.resolved",
    )  # fmt: skip
    assert code == 0 and "webhook 1 added" in out
    code, out, _ = run(capsys, "webhook", "list")
    assert code == 0 and "alert.opened,alert.resolved" in out and "enabled" in out
    assert "a-long-random-secret" not in out

    async def stored() -> list[tuple[str, bool]]:
        engine = create_engine(cli_db)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(webhooks.c.secret, webhooks.c.enabled))).all()
            return [(row[0], bool(row[1])) for row in rows]
        finally:
            await engine.dispose()

    assert asyncio.run(stored()) == [("a-long-random-secret-0123456789", True)]
    assert run(capsys, "webhook", "disable", "1")[0] == 0
    assert asyncio.run(stored()) == [("a-long-random-secret-0123456789", False)]
    code, out, _ = run(capsys, "webhook", "enable", "1")
    assert code == 0 and " enabled " in out
    assert run(capsys, "webhook", "remove", "1") == (0, "webhook 1 removed\n", "")
    assert asyncio.run(stored()) == []
    code, _, err = run(capsys, "webhook", "remove", "1")
    assert code == 2 and "webhook 1 does not exist" in err


def test_webhook_secrets_are_checked(
    cli_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    open_file = tmp_path / "open.secret"
    open_file.write_text("a-long-random-secret-0123456789")
    open_file.chmod(0o644)
    code, _, err = run(
        capsys, "webhook", "add", "https://ops.example.org/hook", "--secret-file", str(open_file)
    )
    assert code == 2 and "chmod 600" in err
    short = tmp_path / "short.secret"
    short.write_text("short")
    short.chmod(0o600)
    code, _, err = run(capsys, "webhook", "add", "https://ops.example.org/hook", "--secret-file", str(short))
    assert code == 2 and "at least 16 characters" in err
    code, _, err = run(capsys, "webhook", "add", "ftp://ops.example.org/", "--secret-file", str(short))
    assert code == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("another-long-secret-from-stdin\n"))
    code, out, _ = run(
        capsys, "webhook", "add", "http://127.0.0.1:9/hook", "--secret-file", "-", "--disabled"
    )
    assert code == 0 and "disabled" in out
