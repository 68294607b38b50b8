"""Edge paths of the shared helpers: codec failures outside pydantic, secret-file I/O errors."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from pydantic import BaseModel, model_validator

from micboard.shared.codec import decode_model
from micboard.shared.errors import ConfigError, ErrorCode, WireError
from micboard.shared.secret_files import check_config_file, write_secret_file


class _Picky(BaseModel):
    """A model whose validator fails with TypeError, which pydantic does not wrap."""

    value: int

    @model_validator(mode="after")
    def _refuse(self) -> _Picky:
        if self.value == 13:
            raise TypeError("unlucky value")
        return self


def test_decode_model_turns_type_error_of_a_validator_into_wire_error() -> None:
    assert decode_model(msgpack.packb({"value": 7}), _Picky).value == 7
    with pytest.raises(WireError) as info:
        decode_model(msgpack.packb({"value": 13}), _Picky)
    assert info.value.code == ErrorCode.WIRE_INVALID
    assert "invalid _Picky" in str(info.value) and "unlucky value" in str(info.value)


def test_check_config_file_refuses_an_unreadable_path(tmp_path: Path) -> None:
    # A directory where the config file should be cannot be read: that is a ConfigError, not a crash.
    directory = tmp_path / "collector.toml"
    directory.mkdir()
    with pytest.raises(ConfigError) as info:
        check_config_file(directory, what="collector config")
    assert "cannot read collector config" in str(info.value)
    assert str(directory) in str(info.value)


def test_check_config_file_ignores_missing_and_secretless_files(tmp_path: Path) -> None:
    check_config_file(tmp_path / "absent.toml")
    plain = tmp_path / "plain.toml"
    plain.write_text('site = "hall"\nnats_url = "tls://nats.example.org:4222"\n')
    plain.chmod(0o644)
    check_config_file(plain)  # world-readable is fine without secrets
    secret = tmp_path / "secret.toml"
    secret.write_text("password = hunter22\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError):
        check_config_file(secret)


def test_write_secret_file_failure_leaves_no_temporary_file(tmp_path: Path) -> None:
    # The target is a non-empty directory: the final rename fails and the temp file is removed.
    target = tmp_path / "agent.creds"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_secret_file(target, "SECRET DATA")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.creds"]
    assert (target / "keep").read_text() == "x"


def test_write_secret_file_creates_private_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "agent.nk"
    write_secret_file(target, "first")
    write_secret_file(target, b"second")
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["agent.nk"]
