"""Agent settings: ``MICBOARD_*`` environment variables, an optional ``.env``, or a TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field

from micboard.shared.envelope import Token
from micboard.shared.errors import ConfigError
from micboard.shared.settings import MicboardSettings, load_settings


class AgentSettings(MicboardSettings):
    """Everything the venue agent needs to know to run."""

    site: Token = Field(default="demo", description="site token: [a-z0-9_-]{1,64}")
    agent: Token = Field(default="agent-1", description="agent token, unique in the fleet")
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=300)
    publish_timeout_s: float = Field(default=5.0, gt=0, le=60)
    nats_connect_timeout_s: float = Field(default=2.0, gt=0, le=60)


def load_agent_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Load settings from ``config_file`` (TOML) if given, then the environment, then ``overrides``.

    Values in the file are defaults; ``MICBOARD_*`` variables win over them.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_values = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
    settings = load_settings(AgentSettings, **overrides)
    if not file_values:
        return settings
    # Environment beats file: only take file values for fields the environment left unset.
    explicit = settings.model_fields_set
    merged = {k: v for k, v in file_values.items() if k not in explicit}
    return load_settings(AgentSettings, **{**merged, **overrides})
