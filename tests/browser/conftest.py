"""A live fleet for the dashboard's browser tests, and Debian's Chromium driven by Playwright.

The stack is the real thing: a nats-server, the collector (SQLite in the test's temp
directory) serving the dashboard, the agent daemon adopting Shure simulators by address, and
a headless Chromium. Without ``/usr/bin/chromium`` the tests skip loudly; under ``CI=true``
they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from micboard.agent.daemon import AgentDaemon
from micboard.agent.drivers.shure.simulator import ShureSimulator
from micboard.agent.settings import AgentSettings
from micboard.collector.app import Collector
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats

CHROMIUM = Path(os.environ.get("MICBOARD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SITE = "venue-a"
AGENT = "pi-a"


def _browser_problem() -> str | None:
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (install Debian's package: apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed ({exc}); install the dev dependency group"
    return None


BROWSER_PROBLEM = _browser_problem()


def pytest_report_header(config: pytest.Config) -> str:
    """Say at the top of every run whether the browser tests run."""
    if BROWSER_PROBLEM is None:
        return f"browser tests: Chromium at {CHROMIUM}"
    tail = " and this CI run FAILS" if IN_CI else ""
    return f"!!! BROWSER TESTS SKIPPED: {BROWSER_PROBLEM}{tail}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (locally) or fail (under CI) every browser test when Chromium cannot run."""
    if BROWSER_PROBLEM is None:
        return
    here = Path(__file__).parent
    mine = [item for item in items if here in Path(str(item.fspath)).parents]
    if not mine:
        return
    message = f"browser tests cannot run: {BROWSER_PROBLEM}"
    print(f"\n!!! {message}\n", file=sys.stderr)
    if IN_CI:
        raise pytest.UsageError(f"{message} (CI=true requires it)")
    warnings.warn(message, stacklevel=1)
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=f"!!! {message}"))


@dataclass
class LiveFleet:
    """A running collector fed by a real agent that polls simulators."""

    url: str
    nats: EmbeddedNats
    site: str
    agent: str
    collector: Collector
    daemon: AgentDaemon
    simulators: list[ShureSimulator]
    tokens: dict[str, str] = field(default_factory=dict)

    async def api(
        self, method: str, path: str, *, role: str = "operator", json: Any = None
    ) -> tuple[int, Any]:
        """Call the REST API as ``role``; returns the status and the decoded body (or text)."""
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, f"{self.url}/api/v1{path}", headers=headers, json=json) as response,
        ):
            text = await response.text()
            try:
                body: Any = await response.json(content_type=None)
            except ValueError:
                body = text
            return response.status, body

    async def wait_for(
        self, probe: Callable[[], Awaitable[Any]], *, timeout_s: float = 10.0, what: str = "condition"
    ) -> Any:
        """Poll ``probe`` until it returns something truthy; fail with ``what`` after the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last: Any = None
        while loop.time() < deadline:
            last = await probe()
            if last:
                return last
            await asyncio.sleep(0.1)
        pytest.fail(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


async def _create_token(collector: Collector, role: str) -> str:
    # The API's token store: the same one ``micboard-collector token create`` writes to.
    from micboard.collector.api.auth import Role, TokenStore

    running = collector.running
    assert running is not None
    _, token = await TokenStore(running.engine).create(f"browser-{role}", Role(role))
    return token


async def start_fleet(
    tmp_path: Path,
    *,
    simulators: int = 1,
    kind: str = "ulxd4q",
    meter_rate_hz: float = 5.0,
    meter_interval_ms: int = 200,
) -> LiveFleet:
    """Start nats-server, the collector, ``simulators`` receivers and an agent adopting them.

    ``meter_rate_hz`` (agent to collector and on to the browser) and ``meter_interval_ms``
    (receiver to agent) set how much meter traffic the fleet makes.
    """
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    await asyncio.to_thread(nats.start)
    collector = Collector(
        CollectorSettings(
            nats_url=nats.url,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'collector.db'}",
            http_port=0,
            state_dir=tmp_path / "collector",
            fetch_timeout_s=0.1,
        )
    )
    sims = [ShureSimulator(kind, index=i, port=0, seed=i + 1, activity=0.0) for i in range(simulators)]
    daemon: AgentDaemon | None = None
    try:
        running = await collector.start()
        for sim in sims:
            await sim.start()
        settings = AgentSettings(
            site=SITE,
            agent=AGENT,
            nats_url=nats.url,
            state_dir=tmp_path / "agent",
            heartbeat_interval_s=1.0,
            discovery_mdns=False,
            discovery_slp=False,
            meter_rate_hz=meter_rate_hz,
            meter_interval_ms=meter_interval_ms,
            static_devices=[
                {"address": sim.host, "port": sim.port, "family": sim.family.value, "name": sim.device_id}
                for sim in sims
            ],
        )
        daemon = AgentDaemon(settings)
        await daemon.start()
        fleet = LiveFleet(running.url, nats, SITE, AGENT, collector, daemon, sims)
        for role in ("viewer", "operator", "admin"):
            fleet.tokens[role] = await _create_token(collector, role)
        return fleet
    except BaseException:
        await _stop(collector, daemon, sims, nats)
        raise


async def _stop(
    collector: Collector, daemon: AgentDaemon | None, sims: list[ShureSimulator], nats: EmbeddedNats
) -> None:
    if daemon is not None:
        await daemon.close()
    for sim in sims:
        await sim.stop()
    await collector.stop()
    await asyncio.to_thread(nats.cleanup)


async def stop_fleet(fleet: LiveFleet) -> None:
    """Stop everything :func:`start_fleet` started, agent first."""
    await _stop(fleet.collector, fleet.daemon, fleet.simulators, fleet.nats)


async def wait_for_channels(live: LiveFleet, count: int, timeout_s: float = 15.0) -> None:
    """Wait until the API lists ``count`` channels of the site; fail saying what the API answered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    status: int = 0
    body: Any = None
    while loop.time() < deadline:
        status, body = await live.api("GET", f"/channels?site={live.site}&limit=1000")
        if status == 200 and isinstance(body, dict) and len(body.get("items", [])) >= count:
            return
        await asyncio.sleep(0.1)
    pytest.fail(
        f"the API did not list {count} channels of {live.site} within {timeout_s}s: "
        f"GET /api/v1/channels answered {status} {str(body)[:300]}"
    )


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LiveFleet]:
    """One ULX-D quad receiver (four channels) at site ``venue-a``, behind a real agent."""
    live = await start_fleet(tmp_path)
    try:
        await wait_for_channels(live, 4)
        yield live
    finally:
        await stop_fleet(live)


@dataclass
class BrowserPage:
    """A Chromium page with what it logged, saving screenshots under the test's temp directory."""

    page: Any  # playwright.async_api.Page (kept loose: the module is optional locally)
    shots: Path
    console: list[str] = field(default_factory=list)
    count: int = 0

    async def shot(self, name: str) -> Path:
        """Save a full-page screenshot as ``NN-name.png`` and return its path."""
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[BrowserPage]:
    """A fresh headless Chromium page (1440x900); a final screenshot is always saved."""
    from playwright.async_api import async_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 1440, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(10_000)
        holder = BrowserPage(page, shots)
        page.on("console", lambda m: holder.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: holder.console.append(f"pageerror: {e}"))
        try:
            yield holder
        finally:
            try:
                await holder.shot("final")
            finally:
                if holder.console:
                    print("browser console:\n  " + "\n  ".join(holder.console))
                await context.close()
                await browser.close()
