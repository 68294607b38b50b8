"""``micboard-collector``: run the collector, and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
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
    return parser


async def _run() -> int:
    settings = load_settings(CollectorSettings)
    configure_logging(settings.log_level, settings.log_format)
    collector = Collector(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await collector.start()
    print(f"micboard collector listening on {running.url} (NATS {running.nats_url})", flush=True)  # noqa: T201
    try:
        await stop.wait()
    finally:
        await collector.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``micboard-collector``; returns the process exit code."""
    build_parser().parse_args(argv)
    try:
        return asyncio.run(_run())
    except MicboardError as exc:
        print(f"micboard-collector: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
