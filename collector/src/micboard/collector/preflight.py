"""``micboard-collector check``: is this collector ready to run? Settings, database, schema, NATS.

Each check says what it found in one line; the exit code names the first thing that is wrong.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import IntEnum

import nats
from nats.errors import Error as NatsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from micboard.collector.security.natsauth import collector_connect_options
from micboard.collector.settings import CollectorSettings
from micboard.collector.store import migrate
from micboard.shared.errors import ConfigError, NatsServerError
from micboard.shared.natsauth import without_userinfo
from micboard.shared.natsd import find_nats_server

_TIMEOUT_S = 3.0


class CheckExit(IntEnum):
    """Exit codes of ``micboard-collector check`` (2 is an invalid setting, as for every command)."""

    OK = 0
    SETTINGS = 2
    DATABASE_UNREACHABLE = 3
    SCHEMA_NOT_CURRENT = 4
    NATS_UNREACHABLE = 5


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str
    exit_code: CheckExit = CheckExit.OK

    def line(self) -> str:
        """The result as one line for people."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


async def check_database(settings: CollectorSettings) -> list[CheckResult]:
    """The database answers, and its schema is at the revision of this build."""
    url = settings.resolved_database_url()
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        found = await migrate.state(url)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return [
            CheckResult(
                "database", False, f"{shown} unreachable: {exc}"[:400], CheckExit.DATABASE_UNREACHABLE
            )
        ]
    results = [CheckResult("database", True, f"{shown} reachable")]
    if found.at_head:
        results.append(CheckResult("schema", True, f"at head revision {found.head}"))
    else:
        auto = settings.auto_migrate == "always" or (
            settings.auto_migrate == "empty-sqlite" and found.empty and url.startswith("sqlite")
        )
        detail = f"at revision {found.current or 'none (empty)'}, this build needs {found.head}; " + (
            "`run` will migrate it automatically" if auto else "run `micboard-collector migrate`"
        )
        # A schema that `run` migrates by itself (a new SQLite file) does not stop it: ready.
        results.append(
            CheckResult("schema", auto, detail, CheckExit.OK if auto else CheckExit.SCHEMA_NOT_CURRENT)
        )
    return results


async def check_nats(settings: CollectorSettings) -> CheckResult:
    """The configured NATS server answers with JetStream, or the embedded server can be started."""
    if settings.nats_url is None:
        try:
            binary = find_nats_server(settings.nats_server_bin)
        except NatsServerError as exc:
            return CheckResult("nats", False, exc.message, CheckExit.NATS_UNREACHABLE)
        return CheckResult("nats", True, f"none configured: the embedded nats-server ({binary}) will run")

    async def quiet(_exc: Exception) -> None:
        # The failure is reported once below; nats-py would print a traceback per attempt.
        return None

    # As the collector connects: its credentials, CA and required TLS (without them a secured
    # server refuses the check while it would accept the collector). The URL is shown without
    # any user:password it carries.
    shown = without_userinfo(settings.nats_url)
    try:
        options = collector_connect_options(settings, settings.nats_url)
    except ConfigError as exc:
        return CheckResult("nats", False, f"{shown}: {exc.message}", CheckExit.NATS_UNREACHABLE)
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                **options,
                servers=[settings.nats_url],
                connect_timeout=_TIMEOUT_S,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
                name="micboard-collector-check",
            ),
            timeout=_TIMEOUT_S * 2,
        )
    except (NatsError, OSError, TimeoutError) as exc:
        return CheckResult(
            "nats", False, f"{shown} unreachable: {type(exc).__name__}: {exc}", CheckExit.NATS_UNREACHABLE
        )
    try:
        info = await nc.jetstream(timeout=_TIMEOUT_S).account_info()
    except (NatsError, TimeoutError) as exc:
        return CheckResult(
            "nats",
            False,
            f"{shown} answers but JetStream does not: {type(exc).__name__}: {exc}",
            CheckExit.NATS_UNREACHABLE,
        )
    finally:
        await nc.close()
    return CheckResult("nats", True, f"{shown} reachable, JetStream with {info.streams} streams")


async def run_checks(settings: CollectorSettings) -> list[CheckResult]:
    """Every check, in order: database, schema, NATS (settings were validated to get here)."""
    return [
        CheckResult("settings", True, "valid"),
        *await check_database(settings),
        await check_nats(settings),
    ]


def exit_code(results: list[CheckResult]) -> int:
    """The exit code of the first failed check, or 0."""
    return next((int(r.exit_code) for r in results if not r.ok), int(CheckExit.OK))
