"""Settings base: environment variables with the ``MICBOARD_`` prefix and an optional ``.env``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from micboard.shared.errors import ConfigError
from micboard.shared.secret_files import check_config_file

_SettingsT = TypeVar("_SettingsT", bound="MicboardSettings")


def _listed(value: Any) -> Any:
    """A list setting given as text (an environment variable): JSON, or items separated by commas."""
    if not isinstance(value, str):
        return value  # a list from a config file, or whatever validation will refuse
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON list ({exc}); or give the items separated by commas") from None
    return [item.strip() for item in text.split(",") if item.strip()]


StrList = Annotated[list[str], NoDecode, BeforeValidator(_listed)]
"""A list of strings that an environment variable gives as ``a,b`` or as JSON ``["a","b"]``."""

FloatList = Annotated[list[float], NoDecode, BeforeValidator(_listed)]
"""A list of numbers that an environment variable gives as ``60,120`` or as JSON ``[60,120]``."""


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
    except SettingsError as exc:
        # A value pydantic-settings could not parse (a structured setting that is not JSON).
        raise ConfigError(f"invalid settings: {exc}") from None
    except ValidationError as exc:
        # A check across fields has no location: its message names the fields itself.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
