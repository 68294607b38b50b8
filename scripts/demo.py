#!/usr/bin/env python3
"""The demo on embedded defaults: a nats-server, the collector on SQLite, and an agent.

Everything listens on 127.0.0.1. The agent polls a small rack of simulated receivers
(``micboard-agent simulate``), listed in its config by address. Prints the URL to open;
Ctrl-C stops it all. ``--check`` starts everything, waits until the API lists the rack, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micboard.shared.natsd import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO_RACK = ("ulxd4q", "ad4d", "ewdx-em2")
_FAMILIES = {"ulxd4q": "ulxd", "ad4d": "axient", "ewdx-em2": "ewdx"}
#: The rack's first port: the same ports every run give the receivers the same keys, so a demo
#: started again over its state directory shows the same receivers, not new ones beside the old.
RACK_PORT_BASE = 42202


def port_is_free(port: int) -> bool:
    """Whether a server can listen on ``port`` on loopback now."""
    with socket.socket() as sock:
        # As the servers do (asyncio's default): a port the last run left in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def rack_ports_free(base: int) -> bool:
    """Whether each simulator of the rack can listen on ``base`` plus its position (UDP for SSC)."""
    for position, kind in enumerate(DEMO_RACK):
        kind_of_socket = socket.SOCK_DGRAM if _FAMILIES[kind] == "ewdx" else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind_of_socket) as sock:
            if kind_of_socket == socket.SOCK_STREAM:
                # As asyncio's servers do; not for UDP, where it would let two sockets share a port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", base + position))
            except OSError:
                return False
    return True


def get_json(url: str, token: str) -> Any:
    """GET ``url`` with the API token and decode its JSON body."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310  # nosec B310  # loopback URL
        return json.load(response)


def start_rack(env: dict[str, str], config: Path, port_base: int) -> subprocess.Popen[bytes]:
    """Run the simulator rack (on ``port_base`` + n, or free ports if 0) and list it in an agent config."""
    ports = ["--port-base", str(port_base)] if port_base else ["--any-port"]
    rack = subprocess.Popen(  # noqa: S603 - our own entry point
        [BIN / "micboard-agent", "simulate", *(a for k in DEMO_RACK for a in ("--device", k)),
         *ports, "--no-announce", "--time-scale", "10"],
        env=env, stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert rack.stdout is not None
    entries: list[str] = []
    for raw in rack.stdout:
        line = raw.decode()
        if "listening on" in line:
            kind, endpoint = line.split()[0], line.split("listening on ")[1].split()[1]
            port = endpoint.rsplit(":", 1)[1]
            entries.append(
                f'[[static_devices]]\naddress = "127.0.0.1"\nport = {port}\nfamily = "{_FAMILIES[kind]}"\n'
            )
        if "Ctrl-C" in line:
            break
    if len(entries) != len(DEMO_RACK):
        rack.terminate()
        raise SystemExit("demo: the simulator rack did not start")
    config.write_text("discovery_mdns = false\ndiscovery_slp = false\n\n" + "\n".join(entries))
    return rack


def wait_for_device(
    url: str,
    token: str,
    timeout_s: float,
    expected: int = 1,
    since_ms: int = 0,
    children: Sequence[subprocess.Popen[bytes]] = (),
) -> list[dict[str, Any]]:
    """Poll the device list until ``expected`` devices were reported since ``since_ms``; returns all.

    Gives up at once when one of ``children`` exits: its own error is above, and waiting on
    would only add a vaguer one.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stopped = [child for child in children if child.poll() is not None]
        if stopped:
            name = Path(str(stopped[0].args[0])).name if isinstance(stopped[0].args, list) else "a service"
            raise SystemExit(f"demo: {name} stopped (exit code {stopped[0].returncode}); see its error above")
        try:
            items: list[dict[str, Any]] = get_json(f"{url}/api/v1/devices", token)["items"]
            # Devices of an earlier run are listed at once: wait for this run's agent.
            if sum(item["updated_ms"] >= since_ms for item in items) >= expected:
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
    parser.add_argument(
        "--rack-port-base",
        type=int,
        default=RACK_PORT_BASE,
        help="the simulators listen on this port + n (0: any free ports)",
    )
    parser.add_argument("--check", action="store_true", help="exit once the device is listed")
    args = parser.parse_args()
    rack_base = args.rack_port_base
    if rack_base and not rack_ports_free(rack_base):
        print(
            f"demo: ports {rack_base}-{rack_base + len(DEMO_RACK) - 1} are taken; the simulators "
            "take free ports, so the collector sees their receivers as new ones",
            flush=True,
        )
        rack_base = 0

    port = args.port if args.port and port_is_free(args.port) else free_port()
    args.state_dir.mkdir(parents=True, exist_ok=True)
    # Every service in a session of its own: a Ctrl-C in the terminal reaches only this script,
    # which stops them in order (the agent, then the collector, then NATS) instead of all at
    # once, when the services lost NATS while still stopping and logged reconnect errors.
    nats = EmbeddedNats(
        store_dir=args.state_dir / "nats",
        new_session=True,
        binary=os.environ.get("MICBOARD_NATS_SERVER_BIN"),  # the collector's setting, read alike
    )
    nats.start()
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": nats.url,
        "MICBOARD_STATE_DIR": str(args.state_dir),
        # The demo's own database: brought up to this build's schema however old it is.
        "MICBOARD_AUTO_MIGRATE": "always",
        "MICBOARD_HTTP_PORT": str(port),
        "MICBOARD_SITE": "demo",
        "MICBOARD_AGENT": "demo-agent",
        # An admin API token the collector creates at start if absent; printed below for the page.
        "MICBOARD_BOOTSTRAP_TOKEN": os.environ.get("MICBOARD_BOOTSTRAP_TOKEN")
        or "mbt_" + secrets.token_urlsafe(32),
    }
    children: list[subprocess.Popen[bytes]] = []
    started_ms = time.time_ns() // 1_000_000
    try:
        children.append(
            subprocess.Popen([BIN / "micboard-collector", "run"], env=env, start_new_session=True)  # noqa: S603
        )
        config = args.state_dir / "demo-agent.toml"
        children.append(start_rack(env, config, rack_base))
        children.append(
            subprocess.Popen(  # noqa: S603
                [BIN / "micboard-agent", "run", "--config", config], env=env, start_new_session=True
            )
        )
        url = f"http://127.0.0.1:{port}"
        token = env["MICBOARD_BOOTSTRAP_TOKEN"]
        items = wait_for_device(
            url, token, timeout_s=30, expected=len(DEMO_RACK), since_ms=started_ms, children=children
        )
        print(
            f"\nmicboard demo is running: open {url}/ "
            f"({len(items)} device(s) listed). Ctrl-C stops it.\n"
            f"admin API token (paste it into the page): {token}\n",
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
        # A second Ctrl-C must not cut the shutdown short and leave services running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The agent first (it flushes what it holds to NATS), then the rack and the collector.
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        nats.stop()


if __name__ == "__main__":
    sys.exit(main())
