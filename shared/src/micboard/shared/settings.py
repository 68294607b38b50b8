"""Settings base: environment variables with the ``MICBOARD_`` prefix and an optional ``.env``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from micboard.shared.errors import ConfigError
from micboard.shared.secret_files import check_config_file

_SettingsT = TypeVar("_SettingsT", bound="MicboardSettings")


class MicboardSettings(BaseSettings):
    """Settings common to every micboard process; each program extends it with its own."""

    model_config = SettingsConfigDict(
        env_prefix="MICBOARD_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["kv", "json"] = "kv"
    state_dir: Path = Field(default=Path("state"), description="where files that must persist live")
    nats_url: str | None = Field(
        default=None, description="NATS server URL; unset means start an embedded nats-server"
    )
    max_message_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)


def load_settings(cls: type[_SettingsT], **overrides: Any) -> _SettingsT:
    """Build settings from the environment and ``overrides``, turning errors into :class:`ConfigError`."""
    # A .env may hold passwords or tokens: refuse it when world-readable.
    check_config_file(Path(".env"), what=".env file")
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
