"""Collector settings: ``MICBOARD_*`` environment variables or an optional ``.env``."""

from __future__ import annotations

from pydantic import Field

from micboard.shared.settings import MicboardSettings


class CollectorSettings(MicboardSettings):
    """Everything the collector needs to know to run."""

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; unset means SQLite in the state directory",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    stream_name: str = Field(default="MICBOARD", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    durable_name: str = Field(default="collector", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    stream_max_bytes: int = Field(default=1024**3, gt=0)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    duplicate_window_s: float = Field(default=120.0, gt=0)
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=20, ge=1)
    batch_size: int = Field(default=256, ge=1, le=10_000)
    fetch_timeout_s: float = Field(default=1.0, gt=0)

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to ``micboard.db`` in the state directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'micboard.db').resolve()}"
