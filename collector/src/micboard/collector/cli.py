"""``micboard-collector``: run the collector, and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from alembic.util.exc import CommandError
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from micboard.collector import admin_commands, preflight
from micboard.collector.api import token_commands
from micboard.collector.app import Collector
from micboard.collector.security import commands as security_commands
from micboard.collector.settings import CollectorSettings
from micboard.collector.store import migrate
from micboard.shared import __version__
from micboard.shared.errors import MicboardError
from micboard.shared.logs import configure_logging
from micboard.shared.settings import load_settings

log = logging.getLogger("micboard.collector")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the collector."""
    parser = argparse.ArgumentParser(prog="micboard-collector", description="micboard fleet collector")
    parser.add_argument("--version", action="version", version=f"micboard-collector {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the collector until stopped (SIGTERM / Ctrl-C)")
    migrate_cmd = sub.add_parser("migrate", help="upgrade the database schema to this build's revision")
    migrate_cmd.add_argument("--revision", default="head", help="target revision (default: head)")
    sub.add_parser(
        "check",
        help="check settings, database, schema revision and NATS; exit 0 when ready to run",
        description="Exit codes: 0 ready, 2 invalid settings, 3 database unreachable, "
        "4 schema not at this build's revision, 5 NATS unreachable.",
    )
    security_commands.register(sub)
    token_commands.register(sub)
    admin_commands.register(sub)
    return parser


async def _run() -> int:
    settings = load_settings(CollectorSettings)
    configure_logging(settings.log_level, settings.log_format)
    collector = Collector(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A signal must end the start too: it can wait without end for a NATS server that is down.
    starting = asyncio.create_task(collector.start(), name="collector-start")
    stopped = asyncio.create_task(stop.wait(), name="collector-stop")
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # start() stops what it had started
        await asyncio.gather(starting, return_exceptions=True)
        log.info("stopped before the collector was ready")
        return 0
    stopped.cancel()
    running = starting.result()
    print(f"micboard collector listening on {running.url} (NATS {running.nats_url})", flush=True)  # noqa: T201
    try:
        await stop.wait()
    finally:
        await collector.stop()
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    settings = load_settings(CollectorSettings)
    configure_logging(settings.log_level, settings.log_format)
    url = settings.resolved_database_url()
    before = await migrate.current(url)
    await migrate.upgrade(url, args.revision)
    after = await migrate.current(url)
    print(f"database migrated: {before or 'empty'} -> {after}", flush=True)  # noqa: T201 - CLI output
    return 0


async def _check(_args: argparse.Namespace) -> int:
    settings = load_settings(CollectorSettings)
    results = await preflight.run_checks(settings)
    for result in results:
        print(result.line(), flush=True)  # noqa: T201 - CLI output
    return preflight.exit_code(results)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``micboard-collector``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "migrate":
            return asyncio.run(_migrate(args))
        if args.command == "check":
            return asyncio.run(_check(args))
        return asyncio.run(_run())
    except MicboardError as exc:
        print(f"micboard-collector: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    except (ArgumentError, CommandError) as exc:
        # An unparseable database URL, an unknown --revision: what was asked cannot be done.
        print(f"micboard-collector: {_first_line(exc)}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    except (SQLAlchemyError, OSError) as exc:
        if args.command == "run" and not isinstance(exc, SQLAlchemyError):
            # Anything of the start that the OS refused: the HTTP port taken, a file not readable.
            print(f"micboard-collector: cannot start: {_first_line(exc)}", file=sys.stderr)  # noqa: T201
            return 1
        # The database (or the state directory holding it) cannot be reached or used; the
        # exit code is check's "database unreachable".
        print(  # noqa: T201 - CLI output
            f"micboard-collector: database or state directory unusable: {_first_line(exc)}", file=sys.stderr
        )
        return 3


def _first_line(exc: BaseException) -> str:
    """The error as one line: its type and the first line of its message (SQLAlchemy adds more)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
