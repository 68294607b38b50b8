"""``micboard-agent``: run the venue agent, and the tools around it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from micboard.agent.demo_source import demo_device
from micboard.agent.runner import AgentRunner
from micboard.agent.settings import load_agent_settings
from micboard.shared import __version__
from micboard.shared.errors import MicboardError
from micboard.shared.logs import configure_logging

log = logging.getLogger("micboard.agent")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the agent."""
    parser = argparse.ArgumentParser(prog="micboard-agent", description="micboard fleet venue agent")
    parser.add_argument("--version", action="version", version=f"micboard-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until stopped (SIGTERM / Ctrl-C)")
    run.add_argument("--config", type=Path, help="TOML settings file (MICBOARD_* variables win)")
    run.add_argument(
        "--demo-device", action="store_true", help="report one fixed in-process receiver (no hardware needed)"
    )
    return parser


async def _run(args: argparse.Namespace) -> int:
    settings = load_agent_settings(args.config)
    configure_logging(settings.log_level, settings.log_format)
    devices = [demo_device()] if args.demo_device else []
    runner = AgentRunner(settings, devices)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    await runner.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``micboard-agent``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except MicboardError as exc:
        print(f"micboard-agent: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
