"""CPU share and peak memory of the agent with 64 metered channels, next to an idle agent.

Runs, in one go: an embedded nats-server with the event stream, a rack of 16 simulated ULX-D
quad receivers (64 channels metering every 100 ms) in a process of its own, then the agent
twice as a subprocess, each measured over the same window from ``/proc/<pid>/stat`` (CPU) and
``/proc/<pid>/status`` (``VmHWM``, peak RSS):

1. idle: the same agent with no devices (discovery off);
2. loaded: the agent polling and metering the rack (listed by address).

Goals: under 10 % of one core and under 80 MB peak RSS when loaded.
Run: ``.venv/bin/python bench/agent.py [--seconds 15] [--receivers 16]``. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.js.api import StreamConfig

from micboard.shared.natsd import EmbeddedNats, free_port
from micboard.shared.subjects import stream_subjects

BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_GOAL_PERCENT = 10.0
RSS_GOAL_MB = 80.0


@dataclass(frozen=True, slots=True)
class Sample:
    """CPU and memory of one process over one window."""

    cpu_percent: float
    peak_rss_mb: float
    rss_mb: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_mb(pid: int, key: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of ``pid`` in MB."""
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def measure(pid: int, seconds: float) -> Sample:
    """CPU share of one core over ``seconds``, and memory at the end."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return Sample(100 * (cpu1 - cpu0) / (t1 - t0), memory_mb(pid, "VmHWM"), memory_mb(pid, "VmRSS"))


def create_stream(url: str) -> None:
    """The event stream the collector would create, so that JetStream publishes are acked."""

    async def run() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(StreamConfig(name="MICBOARD", subjects=stream_subjects()))
        await nc.close()

    asyncio.run(run())


def start_rack(receivers: int) -> tuple[subprocess.Popen[bytes], list[int]]:
    """``receivers`` simulated ULXD4Q in their own process; returns it and their ports."""
    args = [str(BIN / "micboard-agent"), "simulate", "--any-port", "--no-announce"]
    for _ in range(receivers):
        args += ["--device", "ulxd4q"]
    rack = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert rack.stdout is not None
    ports: list[int] = []
    for raw in rack.stdout:
        line = raw.decode()
        if "listening on" in line:
            ports.append(int(line.split("listening on ")[1].split()[1].rsplit(":", 1)[1]))
        if "Ctrl-C" in line:
            break
    if len(ports) != receivers:
        rack.kill()
        raise SystemExit("bench: the simulator rack did not start")
    return rack, ports


def agent_config(path: Path, ports: list[int], metrics_port: int) -> Path:
    """A config listing the rack by address, with metering every 100 ms and discovery off."""
    lines = [
        'site = "bench"', 'agent = "bench-agent"', "discovery_mdns = false", "discovery_slp = false",
        "meter_interval_ms = 100", f"metrics_port = {metrics_port}", 'log_level = "WARNING"',
    ]  # fmt: skip
    for port in ports:
        lines += ["", "[[static_devices]]", 'address = "127.0.0.1"', f"port = {port}", 'family = "ulxd"']
    path.write_text("\n".join(lines) + "\n")
    return path


def scrape(port: int) -> dict[str, float]:
    """The agent's metrics as ``name{labels}`` -> value."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def run_agent(
    config: Path, state_dir: Path, nats_url: str, warmup_s: float, seconds: float
) -> tuple[Sample, int]:
    """Run the agent with ``config``, measure it after ``warmup_s``, stop it; (sample, its pid)."""
    env = {**os.environ, "MICBOARD_NATS_URL": nats_url, "MICBOARD_STATE_DIR": str(state_dir)}
    agent = subprocess.Popen(
        [str(BIN / "micboard-agent"), "run", "--config", str(config)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(warmup_s)
        if agent.poll() is not None:
            raise SystemExit(f"bench: the agent exited with {agent.returncode}")
        return measure(agent.pid, seconds), agent.pid
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window of each run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--receivers", type=int, default=16, help="ULXD4Q receivers (4 channels each)")
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("bench/agent.py reads /proc: run it on Linux")

    with (
        tempfile.TemporaryDirectory(prefix="micboard-bench-") as tmp,
        EmbeddedNats(store_dir=Path(tmp) / "nats") as server,
    ):
        create_stream(server.url)
        rack, ports = start_rack(args.receivers)
        try:
            idle_metrics = free_port()
            idle_cfg = agent_config(Path(tmp) / "idle.toml", [], idle_metrics)
            idle, _ = run_agent(idle_cfg, Path(tmp) / "idle-state", server.url, args.warmup, args.seconds)

            loaded_metrics = free_port()
            loaded_cfg = agent_config(Path(tmp) / "loaded.toml", ports, loaded_metrics)
            env = {
                **os.environ,
                "MICBOARD_NATS_URL": server.url,
                "MICBOARD_STATE_DIR": str(Path(tmp) / "state"),
            }
            agent = subprocess.Popen(
                [str(BIN / "micboard-agent"), "run", "--config", str(loaded_cfg)],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(args.warmup)
                before = scrape(loaded_metrics)
                rack_cpu0 = cpu_seconds(rack.pid)
                loaded = measure(agent.pid, args.seconds)
                rack_cpu = 100 * (cpu_seconds(rack.pid) - rack_cpu0) / args.seconds
                after = scrape(loaded_metrics)
            finally:
                agent.terminate()
                agent.wait(timeout=10)
        finally:
            rack.terminate()
            rack.wait(timeout=10)

    channels = args.receivers * 4
    online = after.get('micboard_agent_devices{state="online"}', 0)
    meters = after.get("micboard_agent_meters_published_total", 0) - before.get(
        "micboard_agent_meters_published_total", 0
    )
    states = after.get('micboard_agent_events_total{kind="device"}', 0)
    print(f"agent with {args.receivers} x ULXD4Q = {channels} channels metering every 100 ms")
    print(f"  devices online: {online:.0f} / {args.receivers}")
    print(f"  meter messages published: {meters / args.seconds:.1f}/s (4 Hz per channel)")
    print(f"  device events so far: {states:.0f}")
    print(f"  simulator rack process (not the agent): {rack_cpu:.1f} % of one core")
    print()
    print(f"{'':<24}{'CPU (% of one core)':>22}{'peak RSS (MB)':>16}{'RSS now (MB)':>15}")
    print(f"{'idle (no devices)':<24}{idle.cpu_percent:>22.1f}{idle.peak_rss_mb:>16.1f}{idle.rss_mb:>15.1f}")
    loaded_label = f"loaded ({channels} channels)"
    print(f"{loaded_label:<24}{loaded.cpu_percent:>22.1f}{loaded.peak_rss_mb:>16.1f}{loaded.rss_mb:>15.1f}")
    cpu_ok = loaded.cpu_percent < CPU_GOAL_PERCENT
    rss_ok = loaded.peak_rss_mb < RSS_GOAL_MB
    print(
        f"goals: CPU < {CPU_GOAL_PERCENT:g} % {'met' if cpu_ok else 'MISSED'}, "
        f"peak RSS < {RSS_GOAL_MB:g} MB {'met' if rss_ok else 'MISSED'}"
    )
    return 0 if cpu_ok and rss_ok and online == args.receivers else 1


if __name__ == "__main__":
    sys.exit(main())
