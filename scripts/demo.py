#!/usr/bin/env python3
"""The demo on embedded defaults: a nats-server, the collector on SQLite, and an agent.

Everything listens on 127.0.0.1. Prints the URL to open; Ctrl-C stops it all.
``--check`` starts everything, waits until the API lists the agent's device, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from micboard.shared.natsd import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def get_json(url: str) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # nosec B310 - loopback URL
        return json.load(response)


def wait_for_device(url: str, timeout_s: float) -> list[dict[str, Any]]:
    """Poll the device list until the agent's device shows up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            items: list[dict[str, Any]] = get_json(f"{url}/api/v1/devices")["items"]
            if items:
                return items
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"demo: no device reached {url}/api/v1/devices within {timeout_s:.0f} s")


def main() -> int:
    """Start the demo and keep it running (or check it and stop)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (a free one if taken)")
    parser.add_argument("--state-dir", type=Path, default=ROOT / "state" / "demo")
    parser.add_argument("--check", action="store_true", help="exit once the device is listed")
    args = parser.parse_args()

    port = args.port if args.port and port_is_free(args.port) else free_port()
    args.state_dir.mkdir(parents=True, exist_ok=True)
    nats = EmbeddedNats(store_dir=args.state_dir / "nats")
    nats.start()
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": nats.url,
        "MICBOARD_STATE_DIR": str(args.state_dir),
        "MICBOARD_HTTP_PORT": str(port),
        "MICBOARD_SITE": "demo",
        "MICBOARD_AGENT": "demo-agent",
    }
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(subprocess.Popen([BIN / "micboard-collector", "run"], env=env))  # noqa: S603
        children.append(subprocess.Popen([BIN / "micboard-agent", "run", "--demo-device"], env=env))  # noqa: S603
        url = f"http://127.0.0.1:{port}"
        items = wait_for_device(url, timeout_s=30)
        print(
            f"\nmicboard demo is running: open {url}/api/v1/devices "
            f"({len(items)} device(s) listed). Ctrl-C stops it.\n",
            flush=True,
        )
        if args.check:
            return 0
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        nats.stop()


if __name__ == "__main__":
    sys.exit(main())
