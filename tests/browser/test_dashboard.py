"""The dashboard in a real Chromium against a live collector, agent and simulated receivers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from sqlalchemy import insert

from micboard.collector.store.schema_alerts import alerts

if TYPE_CHECKING:
    from tests.browser.conftest import BrowserPage, LiveFleet

    from micboard.collector.live import Subscription

pytestmark = pytest.mark.timeout(90)

TILE = ".tile[data-index='{index}']"


async def sign_in(browser: BrowserPage, fleet: LiveFleet, role: str = "operator") -> None:
    """Open the dashboard, sign in with a token and wait for the fleet view."""
    page = browser.page
    await page.goto(fleet.url + "/")
    await page.wait_for_selector("#login-form", state="visible")
    await page.fill("#login-token", fleet.tokens[role])
    await page.click("#login-submit")
    await page.wait_for_selector(f".site-card[data-site='{fleet.site}']")


async def open_site(browser: BrowserPage, fleet: LiveFleet, tiles: int = 4) -> None:
    """Go to the site view and wait until its tiles are there and the live link is up."""
    page = browser.page
    await page.click(f".site-card[data-site='{fleet.site}']")
    await page.wait_for_function(f"() => document.querySelectorAll('#tiles .tile').length >= {tiles}")
    await page.wait_for_selector("#live-status[data-live='live']")


async def tile_attr(browser: BrowserPage, index: int, name: str) -> str | None:
    """An attribute of channel ``index``'s tile."""
    value = await browser.page.get_attribute(TILE.format(index=index), name)
    return None if value is None else str(value)


async def test_dashboard_is_served_with_a_strict_policy(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(fleet.url + "/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "connect-src 'self';" in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "no-referrer"
        async with http.get(fleet.url + "/static/app.js") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/javascript")
    page = browser_page.page
    await page.goto(fleet.url + "/")
    await page.wait_for_selector("#login-form", state="visible")
    await browser_page.shot("login")
    # The strict policy did not block any of the page's own scripts or styles.
    assert not [line for line in browser_page.console if "Content Security Policy" in line]


async def test_sign_in_lists_the_site_in_the_fleet_view(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    page = browser_page.page
    await page.goto(fleet.url + "/")
    await page.fill("#login-token", "not-a-token")
    await page.click("#login-submit")
    await page.wait_for_selector("#login-error:not([hidden])")
    assert "not accepted" in (await page.inner_text("#login-error"))

    await page.fill("#login-token", fleet.tokens["viewer"])
    await page.click("#login-submit")
    card = page.locator(f".site-card[data-site='{fleet.site}']")
    await card.wait_for()
    assert await card.locator("[data-stat='online'] dd").inner_text() == "1"
    assert await card.locator("[data-stat='channels'] dd").inner_text() == "4"
    # The header's open-alert count shows once it is known, and then the API's count.
    badge = page.locator("#alert-count:not([hidden])")
    await badge.wait_for()
    for _ in range(20):
        status, body = await fleet.api("GET", "/alerts?state=open&limit=1")
        assert status == 200, body
        if await badge.inner_text() == str(body["total"]):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"badge {await badge.inner_text()!r}, open alerts {body['total']}")
    # The fleet's total counts alerts in force (acknowledged too), and says so, unlike the badge.
    total = page.locator("#fleet-totals [data-total='alerts-in-force'] span")
    assert await total.inner_text() == "Alerts in force"
    # The token lives in sessionStorage, never in the address.
    assert fleet.tokens["viewer"] not in page.url
    stored = await page.evaluate("sessionStorage.getItem('micboard.token')")
    assert stored == fleet.tokens["viewer"]
    await browser_page.shot("fleet")

    # A revoked or wrong token sends the user back to the form.
    await page.evaluate("sessionStorage.setItem('micboard.token', 'expired')")
    await page.reload()
    await page.wait_for_selector("#login-form", state="visible")


async def test_site_view_shows_one_tile_per_channel(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    sim = fleet.simulators[0]
    for index in range(1, 5):
        channel = sim.channel(index)
        tile = page.locator(TILE.format(index=index))
        name_id, _, person = channel.name.partition(" ")
        assert await tile.locator(".chan-id").inner_text() == name_id
        assert await tile.locator(".person").inner_text() == person.replace("_", " ")
        freq = await tile.locator("[data-part='freq']").inner_text()
        assert freq == f"{channel.frequency_khz / 1000:.3f}"
        assert await tile.get_attribute("data-tx") == "on"
        state = await tile.get_attribute("data-state")
        assert state in {"good", "replace", "critical"}
        bars = int(await tile.locator(".battery").get_attribute("data-bars") or "-1")
        assert 0 <= bars <= 5
        runtime = await tile.locator(".runtime").inner_text()
        assert runtime == "—" or runtime.count(":") == 1
    # Live meters arrive: an antenna bar and the audio meter are drawn.
    await page.wait_for_selector(f"{TILE.format(index=1)} .ant[data-antenna='A']")
    await page.wait_for_selector("#legend li[data-state='previously_good']")
    await browser_page.shot("site")
    # A tablet or half a laptop screen: the header wraps instead of cutting controls off.
    for width in (800, 400):
        await page.set_viewport_size({"width": width, "height": 800})
        cut = await page.evaluate(
            """() => [...document.querySelectorAll('#topbar a, #topbar button, #topbar input, #topbar .live')]
                .filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > window.innerWidth)
                .map(e => e.id || e.textContent)"""
        )
        assert cut == [], f"cut off at {width} px: {cut}"
        assert await page.locator("#btn-logout").is_visible()
        await browser_page.shot(f"site-{width}px")


async def test_a_viewer_is_offered_no_control_its_role_does_not_allow(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    await sign_in(browser_page, fleet, role="viewer")
    await open_site(browser_page, fleet)
    page = browser_page.page
    assert await page.get_attribute("body", "data-role") == "viewer"
    assert "(viewer)" in (await page.get_attribute("#btn-logout", "title") or "")
    tile = page.locator(TILE.format(index=1))
    await tile.hover()
    assert await tile.locator("button[data-act='history']").is_visible()
    for act in ("rename", "identify", "forget"):
        assert not await tile.locator(f"button[data-act='{act}']").is_visible(), act
    for control in ("#btn-new-group", "#btn-arrange"):
        assert not await page.locator(control).is_visible(), control
    # The thresholds can be read, not changed.
    await page.click("#btn-thresholds")
    await page.wait_for_selector("#thresholds-dialog[open]")
    assert await page.locator("#thresholds-cancel").is_visible()
    assert not await page.locator("#thresholds-form button[type='submit']").is_visible()
    await page.click("#thresholds-cancel")
    await browser_page.shot("viewer")
    # An operator gets the tile's actions, but not the admin's.
    await page.click("#btn-logout")
    await sign_in(browser_page, fleet, role="operator")
    await open_site(browser_page, fleet)
    await tile.hover()
    assert await tile.locator("button[data-act='rename']").is_visible()
    assert await page.locator("#btn-new-group").is_visible()
    await page.click("#btn-thresholds")
    await page.wait_for_selector("#thresholds-dialog[open]")
    assert not await page.locator("#thresholds-form button[type='submit']").is_visible()


async def test_battery_drop_and_transmitter_off_reach_the_tile_within_2s(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    sim = fleet.simulators[0]
    sim.set_battery(1, bars=5)
    await page.wait_for_function(
        "() => document.querySelector(\"#tiles .tile[data-index='1']\").dataset.state === 'good'",
        timeout=5000,
    )

    started = time.monotonic()
    sim.set_battery(1, bars=1)
    await page.wait_for_function(
        """() => {
            const tile = document.querySelector("#tiles .tile[data-index='1']");
            return tile.dataset.state === 'critical' && tile.querySelector('.battery').dataset.bars === '1';
        }""",
        timeout=2000,
    )
    battery_s = time.monotonic() - started
    await browser_page.shot("battery-critical")

    started = time.monotonic()
    sim.set_transmitter_on(2, False)
    await page.wait_for_function(
        "() => document.querySelector(\"#tiles .tile[data-index='2']\").dataset.tx === 'off'", timeout=2000
    )
    off_s = time.monotonic() - started
    state = await tile_attr(browser_page, 2, "data-state")
    # A transmitter read a moment ago is "previously ..." rather than an error.
    assert state in {"previously_good", "previously_replace", "previously_critical", "unknown"}
    assert await tile_attr(browser_page, 2, "data-tx") == "off"
    # Meters keep coming from the receiver (its audio floor): no level and no peak are drawn.
    await asyncio.sleep(1.0)
    audio = await page.evaluate(
        """() => {
            const tile = document.querySelector("#tiles .tile[data-index='2']");
            return [tile.querySelector("[data-part='audio-fill']").style.transform,
                    tile.querySelector("[data-part='audio-peak']").dataset.visible ?? "0"];
        }"""
    )
    assert audio == ["scaleX(1)", "0"], audio
    await browser_page.shot("transmitter-off")
    assert battery_s < 2.0 and off_s < 2.0


async def test_rename_from_the_tile_reaches_the_receiver(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    tile = page.locator(TILE.format(index=1))
    await tile.hover()
    await tile.locator("button[data-act='rename']").click()
    field = tile.locator(".rename-form input[name='name']")
    # A blank name is refused on the spot, with a word, and nothing is sent.
    await field.fill("   ")
    await field.press("Enter")
    await page.wait_for_function(
        "() => document.querySelector(\"#tiles .tile[data-index='1'] .tile-msg\").textContent"
        ".includes('must not be blank')",
        timeout=2000,
    )
    await field.fill("HH01 Ola")
    await browser_page.shot("rename-form")
    await field.press("Enter")
    sim = fleet.simulators[0]

    async def renamed() -> bool:
        return sim.channel(1).name == "HH01 Ola"

    await fleet.wait_for(renamed, timeout_s=5, what="the simulator to carry the new name")
    # The device confirms through the live flow and the tile follows.
    await page.wait_for_function(
        "() => document.querySelector(\"#tiles .tile[data-index='1'] .person\").textContent === 'Ola'",
        timeout=5000,
    )
    # The name may show (live flow) before the command's reply: the message follows the reply.
    message = "document.querySelector(\"#tiles .tile[data-index='1'] .tile-msg\").textContent"
    await page.wait_for_function(f"() => {message}.includes('Renamed')", timeout=5000)
    assert await tile.locator(".tile-msg").is_visible()
    await browser_page.shot("renamed")


async def test_an_admin_forgets_a_receiver_that_went_offline(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    await sign_in(browser_page, fleet, role="admin")
    await open_site(browser_page, fleet)
    page = browser_page.page
    tile = page.locator(TILE.format(index=1))
    await tile.hover()
    # Reported online: nothing to forget (the agent would report it again).
    assert not await tile.locator("button[data-act='forget']").is_visible()
    await page.wait_for_function(  # a live level with its held peak
        "() => document.querySelector(\"#tiles .tile [data-part='audio-peak'][data-visible='1']\")",
        timeout=5000,
    )
    await fleet.simulators[0].stop()  # unplugged: the agent reports it offline within its timeout
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].every(t => t.dataset.status === 'offline')",
        timeout=15_000,
    )
    # Nothing live is shown for it any more: no level, no held peak.
    peaks = await page.eval_on_selector_all(
        "#tiles .tile [data-part='audio-peak']", "els => els.map(e => e.dataset.visible ?? '')"
    )
    assert peaks and all(p != "1" for p in peaks), peaks
    # Nor a battery as if current: no bars, and the API calls the reading a previous one.
    bars = await page.eval_on_selector_all("#tiles .tile .battery", "els => els.map(e => e.dataset.bars)")
    assert bars and set(bars) == {"0"}, bars
    status, body = await fleet.api("GET", f"/channels?site={fleet.site}")
    assert status == 200 and body["items"], body
    assert all(
        i["battery_state"] in {"previously_good", "previously_replace", "previously_critical", "unknown"}
        for i in body["items"]
    ), body["items"]
    await tile.hover()
    forget = tile.locator("button[data-act='forget']")
    await forget.wait_for(state="visible")
    await browser_page.shot("offline-forget")
    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await forget.click()
    await page.wait_for_function("() => document.querySelectorAll('#tiles .tile').length === 0", timeout=5000)
    assert dialogs and "Forget" in dialogs[0]
    status, body = await fleet.api("GET", f"/devices?site={fleet.site}")
    assert status == 200 and body["items"] == []
    await browser_page.shot("forgotten")


async def test_a_receiver_swapped_for_a_smaller_one_loses_the_tiles_it_no_longer_has(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    from micboard.agent.drivers.shure.simulator import ShureSimulator

    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    quad = fleet.simulators[0]
    await quad.stop()
    # A dual receiver in its place (same address): the agent reports it with two channels.
    dual = ShureSimulator("ulxd4d", port=quad.port, seed=7, activity=0.0)
    await dual.start()
    fleet.simulators[0] = dual  # stopped with the fleet
    page = browser_page.page
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].map(t => t.dataset.index).join() === '1,2'",
        timeout=30_000,
    )
    await browser_page.shot("two-tiles-left")
    status, body = await fleet.api("GET", f"/channels?site={fleet.site}")
    assert status == 200 and [c["index"] for c in body["items"]] == [1, 2]
    assert all(c["model"] == "ULXD4D" for c in body["items"])


async def test_an_admin_moves_the_sites_battery_thresholds_and_the_tiles_follow(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    await sign_in(browser_page, fleet, role="admin")
    await open_site(browser_page, fleet)
    page = browser_page.page
    fleet.simulators[0].set_battery(1, bars=3)
    tile_state = "() => document.querySelector(\"#tiles .tile[data-index='1']\").dataset.state"
    await page.wait_for_function(f"() => ({tile_state})() === 'replace'", timeout=5000)

    await page.click("#btn-thresholds")
    dialog = page.locator("#thresholds-dialog")
    await dialog.wait_for(state="visible")
    assert await page.input_value("#threshold-battery_replace_bars") == "3"
    assert await dialog.locator("small").first.inner_text() == "default"
    # Out of range: the browser refuses it at its field, nothing is sent.
    await page.fill("#threshold-battery_replace_bars", "9")
    await dialog.locator("button[type='submit']").click()
    assert await page.eval_on_selector("#threshold-battery_replace_bars", "e => !e.validity.valid")
    assert await dialog.is_visible()
    # In range but contradictory: the server's refusal names the fields as the dialog does.
    await page.fill("#threshold-battery_replace_bars", "2")
    await page.fill("#threshold-battery_critical_bars", "4")
    await dialog.locator("button[type='submit']").click()
    error = page.locator("#thresholds-error")
    await error.wait_for(state="visible")
    assert "“Critical at bars ≤”" in await error.inner_text()
    # A hall that changes batteries later: replace at 2 bars, critical at 1.
    await page.fill("#threshold-battery_replace_bars", "2")
    await page.fill("#threshold-battery_critical_bars", "1")
    await browser_page.shot("thresholds")
    await dialog.locator("button[type='submit']").click()
    await dialog.wait_for(state="hidden")
    await page.wait_for_function(f"() => ({tile_state})() === 'good'", timeout=5000)
    status, body = await fleet.api("GET", f"/thresholds?site={fleet.site}")
    assert status == 200 and body["overrides"] == {"battery_replace_bars": 2, "battery_critical_bars": 1}

    # Back to the defaults with one button: the tile reads replace again.
    await page.click("#btn-thresholds")
    await dialog.wait_for(state="visible")
    assert await dialog.locator("small[data-own]").count() == 2
    await page.click("#thresholds-defaults")
    await dialog.wait_for(state="hidden")
    await page.wait_for_function(f"() => ({tile_state})() === 'replace'", timeout=5000)
    status, body = await fleet.api("GET", f"/thresholds?site={fleet.site}")
    assert status == 200 and body["overrides"] == {}

    # Every other threshold is under "More thresholds": a hall with RF dropouts of a few seconds.
    await page.click("#btn-thresholds")
    await dialog.wait_for(state="visible")
    more = page.locator("#thresholds-more")
    assert await more.get_attribute("open") is None  # closed: nothing of the site's own in it
    assert await page.locator("#threshold-rf_loss_s").is_hidden()
    await more.locator("summary").click()
    assert await page.input_value("#threshold-rf_loss_s") == "3"
    await page.fill("#threshold-rf_loss_s", "5")
    await browser_page.shot("thresholds-more")
    await dialog.locator("button[type='submit']").click()
    await dialog.wait_for(state="hidden")
    status, body = await fleet.api("GET", f"/thresholds?site={fleet.site}")
    assert status == 200 and body["overrides"] == {"rf_loss_s": 5.0}
    # Shown again, the section opens by itself: the site has a value of its own there.
    await page.click("#btn-thresholds")
    await dialog.wait_for(state="visible")
    assert await more.get_attribute("open") is not None
    assert await page.input_value("#threshold-rf_loss_s") == "5"
    assert await dialog.locator("small[data-own]").count() == 1
    await page.click("#thresholds-defaults")
    await dialog.wait_for(state="hidden")
    status, body = await fleet.api("GET", f"/thresholds?site={fleet.site}")
    assert status == 200 and body["overrides"] == {}


async def test_the_agents_view_shows_each_venue_box_and_retires_one_gone_for_good(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    from micboard.shared import __version__ as agent_version

    await sign_in(browser_page, fleet, role="admin")
    page = browser_page.page
    await page.keyboard.press("g")
    row = page.locator(f"#agent-rows tr[data-agent='{fleet.agent}']")
    await row.wait_for()
    assert await row.get_attribute("data-status") == "online"
    cells = await row.locator("td").all_inner_texts()
    assert cells[1] == fleet.site and cells[2].startswith(fleet.agent)
    assert cells[3] == "1 online"  # its receivers, by state
    assert cells[4] == agent_version
    assert "queued" in cells[7]
    # Heard: nothing to forget (it would come straight back).
    assert await row.locator("button[data-act='forget']").count() == 0
    await browser_page.shot("agents")

    await fleet.daemon.close()  # the venue box is switched off for good
    # The list refreshes itself: the agent turns stale (3 missed heartbeats) and may be forgotten.
    await page.locator(f"#agent-rows tr[data-agent='{fleet.agent}'][data-status='stale']").wait_for(
        timeout=20_000
    )
    # Its receiver's data is old: the desk sees it stale.
    await page.wait_for_function(
        f"() => document.querySelector(\"#agent-rows tr[data-agent='{fleet.agent}'] td.receivers\")"
        ".textContent === '1 stale'",
        timeout=10_000,
    )
    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    await row.locator("button[data-act='forget']").click()
    await row.wait_for(state="detached")
    await page.wait_for_selector("#agents-empty", state="visible")
    toast = await page.locator("#toast").inner_text()
    assert f"Forgot {fleet.agent}: 1 receiver(s)" in toast and f"site {fleet.site} retired" in toast
    assert dialogs and fleet.agent in dialogs[0]
    for path in ("/agents", "/devices", "/sites", "/alerts?state=open"):
        status, body = await fleet.api("GET", path)
        assert status == 200 and body["items"] == [], (path, body)
    # Its alerts went with it: the badge follows.
    await page.wait_for_selector("#alert-count[data-count='0']")
    assert await page.locator("#agent-table").is_hidden()
    await browser_page.shot("agent-forgotten")


async def test_a_lost_live_link_is_shown_and_a_silent_one_is_replaced(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    from playwright.async_api import WebSocketRoute

    page = browser_page.page
    cut = False
    links: list[WebSocketRoute] = []

    def through(route: WebSocketRoute) -> None:
        # While the link is cut, a new socket opens but nothing answers it: a dead link that
        # looks open (a pulled cable, a proxy gone quiet).
        if not cut:
            route.connect_to_server()
        links.append(route)

    await page.route_web_socket("**/api/v1/live", through)
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    assert await page.locator("#link-lost").is_hidden()

    cut = True
    for link in links:
        await link.close()
    banner = page.locator("#link-lost")
    await banner.wait_for(state="visible", timeout=10_000)
    assert "Not live since" in await banner.inner_text()
    # What is shown may be out of date: it must not look current.
    opacity = await page.eval_on_selector("#tiles .tile", "t => Number(getComputedStyle(t).opacity)")
    assert opacity < 0.6
    await browser_page.shot("link-lost")

    # Back: the silent socket is given up (nothing heard for SILENT_LINK_MS) and a new one
    # brings a fresh snapshot; the page is live and current again.
    cut = False
    await page.wait_for_selector("#live-status[data-live='live']", timeout=45_000)
    await banner.wait_for(state="hidden")
    opacity = await page.eval_on_selector("#tiles .tile", "t => Number(getComputedStyle(t).opacity)")
    assert opacity == 1
    assert len(links) >= 3  # the first, the silent one, the one that answered


async def test_live_updates_keep_the_elements_a_click_lands_on(
    fleet: LiveFleet, browser_page: BrowserPage
) -> None:
    """A site card and an alert row stay the same elements while live updates change them.

    Elements rebuilt under the pointer lose clicks: a press and a release that land on two
    different elements make no click, so a card re-rendered at that moment did not open.
    """
    await sign_in(browser_page, fleet)
    page = browser_page.page
    sim = fleet.simulators[0]
    selector = f".site-card[data-site='{fleet.site}']"
    card = await page.locator(selector).element_handle()
    alerts = await page.locator(f"{selector} [data-stat='alerts'] dd").inner_text()
    sim.set_battery(4, bars=1)  # critical: an alert opens and the site's count moves
    await page.wait_for_function(
        f"""() => document.querySelector("{selector} [data-stat='alerts'] dd").textContent !== {alerts!r}""",
        timeout=15_000,
    )
    assert await card.evaluate("node => node.isConnected"), "the card was replaced, not updated"

    await page.keyboard.press("a")
    row = page.locator("#alert-rows tr[data-alert-id]").first
    await row.wait_for()
    kept = await row.element_handle()
    rows = await page.locator("#alert-rows tr[data-alert-id]").count()
    sim.set_battery(3, bars=1)  # another alert: the list re-renders
    await page.wait_for_function(
        f"() => document.querySelectorAll('#alert-rows tr[data-alert-id]').length > {rows}", timeout=15_000
    )
    assert await kept.evaluate("node => node.isConnected"), "an unchanged alert row was rebuilt"
    await browser_page.shot("alerts-updated")
    await page.keyboard.press("f")
    await page.click(selector)  # the kept card still opens its site
    await page.wait_for_function("() => document.querySelectorAll('#tiles .tile').length >= 4")


async def test_acknowledging_an_alert(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    sim = fleet.simulators[0]
    sim.set_battery(3, bars=1)

    async def open_alert() -> dict[str, Any] | None:
        status, body = await fleet.api("GET", f"/alerts?state=open&site={fleet.site}")
        if status != 200:
            return None
        return next((a for a in body.get("items", []) if a.get("channel") == 3), None)

    alert = await fleet.wait_for(open_alert, timeout_s=15, what="an open alert for channel 3")
    await sign_in(browser_page, fleet)
    page = browser_page.page
    await page.keyboard.press("a")
    row = page.locator(f"tr[data-alert-id='{alert['id']}']")
    await row.wait_for()
    # The receiver and channel by the names people gave them, their keys in the title.
    place = row.locator("td").nth(2)
    assert await place.inner_text() == f"{alert['device_name']} · {sim.channel(3).name}"
    assert await place.get_attribute("title") == f"{alert['device_key']} ch 3"
    await browser_page.shot("alerts")
    await row.locator("button[data-act='acknowledge']").click()
    # The list shows open alerts: an acknowledged one leaves it.
    await row.wait_for(state="detached")

    async def acknowledged() -> dict[str, Any] | None:
        status, body = await fleet.api("GET", "/alerts?state=acknowledged")
        items = body.get("items", []) if status == 200 else []
        return next((a for a in items if a["id"] == alert["id"]), None)

    done = await fleet.wait_for(acknowledged, timeout_s=5, what="the alert to be acknowledged")
    assert done["acknowledged_by"]
    await page.select_option("#alert-state", "acknowledged")
    await page.locator(f"tr[data-alert-id='{alert['id']}'][data-state='acknowledged']").wait_for()
    await browser_page.shot("acknowledged")
    # On a phone the list fits the screen (one card per alert), its buttons within reach.
    await page.set_viewport_size({"width": 400, "height": 800})
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= 400
    resolve = page.locator(f"tr[data-alert-id='{alert['id']}'] button[data-act='resolve']")
    box = await resolve.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 400
    await browser_page.shot("alerts-400px")
    # A list cut at its 500 newest says so, with how many there are.
    assert await page.locator("#alerts-more").is_hidden()
    running = fleet.collector.running
    assert running is not None
    now = int(time.time() * 1000)
    rows = [
        {
            "site": fleet.site,
            "agent": fleet.agent,
            "device_key": "old-rx",
            "channel": 1,
            "target": f"old/{n}",
            "rule": "battery_low",
            "severity": "warning",
            "state": "resolved",
            "message": "an old one",
            "opened_ms": now - 86_400_000 - n,
            "observed_ms": now,
            "updated_ms": now,
            "resolved_by": "system",
            "resolved_ms": now,
        }
        for n in range(510)
    ]
    async with running.engine.begin() as conn:
        await conn.execute(insert(alerts), rows)
    _, listed = await fleet.api("GET", "/alerts?state=resolved&limit=1")
    await page.select_option("#alert-state", "resolved")
    more = page.locator("#alerts-more")
    await more.wait_for(state="visible")
    assert await more.inner_text() == f"The newest 500 of {listed['total']} alerts are shown."
    assert await page.locator("#alert-rows tr").count() == 500


async def test_tv_mode_toggles_and_persists(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    assert not await page.evaluate("document.body.classList.contains('tv')")
    await page.keyboard.press("t")
    await page.wait_for_function("() => document.body.classList.contains('tv')")
    assert not await page.is_visible("#topbar")
    size = await page.evaluate(
        "parseFloat(getComputedStyle(document.querySelector('#tiles .tile .person')).fontSize)"
    )
    assert size >= 36  # readable from across a room
    await browser_page.shot("tv")
    await page.reload()
    await page.wait_for_selector("#tiles .tile")
    assert await page.evaluate("document.body.classList.contains('tv')")
    await page.click("#btn-tv-exit")
    await page.wait_for_function("() => !document.body.classList.contains('tv')")
    assert await page.is_visible("#topbar")
    await page.click("#btn-tv")
    await page.wait_for_function("() => document.body.classList.contains('tv')")
    await page.keyboard.press("t")
    await page.wait_for_function("() => !document.body.classList.contains('tv')")


async def test_keyboard_shortcuts_help_and_filter(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    await page.keyboard.press("?")
    await page.wait_for_selector("#help-dialog[open]")
    await browser_page.shot("help")
    await page.keyboard.press("Escape")
    await page.wait_for_selector("#help-dialog", state="hidden")

    await page.keyboard.press("/")
    assert await page.evaluate("document.activeElement.id") == "search"
    person = fleet.simulators[0].channel(2).name.partition(" ")[2]
    await page.keyboard.type(person)
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].filter(t => !t.hidden).length === 1"
    )
    assert await page.is_visible(TILE.format(index=2))
    await page.keyboard.press("Escape")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].filter(t => !t.hidden).length === 4"
    )
    await page.keyboard.press("a")
    await page.wait_for_selector("#view-alerts", state="visible")
    await page.keyboard.press("f")
    await page.wait_for_selector("#view-fleet", state="visible")


async def test_groups_are_arranged_and_persist(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    await page.click("#btn-new-group")
    await page.fill("#group-name", "Band")
    await page.press("#group-name", "Enter")
    await page.wait_for_selector("#arrange-bar", state="visible")
    others = page.locator("#tiles-others")
    await others.locator(".tile[data-index='3'] button[data-act='add']").click()
    await page.locator("#tiles .tile[data-index='3']").wait_for()
    await others.locator(".tile[data-index='1'] button[data-act='add']").click()
    await page.locator("#tiles .tile[data-index='1']").wait_for()
    await page.locator("#tiles .tile[data-index='1'] button[data-act='left']").click()
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].map(t => t.dataset.index).join() === '1,3'"
    )
    await browser_page.shot("arranging")
    await page.click("#btn-arrange-done")

    status, body = await fleet.api("GET", "/groups")
    assert status == 200
    groups = body["items"] if isinstance(body, dict) else body
    band = next(g for g in groups if g["name"] == "Band")
    assert [c["index"] for c in band["channels"]] == [1, 3]

    await page.reload()
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#tiles .tile')].map(t => t.dataset.index).join() === '1,3'"
    )
    assert await page.locator("#group-tabs .tab[aria-selected='true']").inner_text() == "Band\n2"
    await browser_page.shot("group")


async def test_history_chart_opens_from_a_tile(fleet: LiveFleet, browser_page: BrowserPage) -> None:
    await sign_in(browser_page, fleet)
    await open_site(browser_page, fleet)
    page = browser_page.page
    await asyncio.sleep(1.0)  # a few history samples, recorded but not written yet (every 10 s)
    tile = page.locator(TILE.format(index=1))
    await tile.hover()
    await tile.locator("button[data-act='history']").click()
    # The current minute is charted at once: a reading's dot, not "no readings".
    await page.wait_for_selector("#history-dialog[open] svg.battery-chart circle.series-dot")
    await page.wait_for_selector("#history-dialog[open] svg.rf-chart circle.series-dot")
    # RF's weakest reading of each point is drawn too, where a dropout inside a minute shows.
    await page.wait_for_selector("#history-dialog[open] svg.rf-chart path.series-low", state="attached")
    assert await page.locator("#history-dialog .chart-empty").count() == 0
    await browser_page.shot("history")
    await page.keyboard.press("Escape")
    await page.wait_for_selector("#history-dialog", state="hidden")


def live_stats(live: LiveFleet) -> object:
    """The live WebSocket feed's counters (slow clients dropped, resyncs), to explain a slow tile."""
    from micboard.collector.api.context import CONTEXT

    running = live.collector.running
    feed = None if running is None or running.runner.app is None else running.runner.app[CONTEXT].live
    return None if feed is None else feed.stats


async def committed_at(
    live: LiveFleet, subscription: Subscription, device_id: int, device_key: str, index: int, state: str
) -> float:
    """When the collector committed the change that gave channel ``index`` the battery ``state``.

    The monotonic time the live hub announced the device in the commit after which the API shows
    that state: a commit announced earlier but checked late only makes the time earlier, so a
    latency measured from it is never understated. Announcements of other devices are skipped
    without waiting, so a backlog of them does not delay the one that counts.
    """
    async for message in subscription:
        if message.data.get("device_key") != device_key:
            continue
        announced = time.monotonic()
        status, body = await live.api("GET", f"/channels?device_id={device_id}&limit=100")
        assert status == 200, body
        if any(c["index"] == index and c["battery_state"] == state for c in body["items"]):
            return announced
    raise AssertionError("the live hub closed")


async def test_an_axient_tile_shows_the_receivers_own_antenna_states(
    tmp_path: Path, browser_page: BrowserPage
) -> None:
    from tests.browser.conftest import start_fleet, stop_fleet, wait_for_channels

    live = await start_fleet(tmp_path / "fleet", kind="ad4q")
    try:
        await wait_for_channels(live, 4, timeout_s=30)
        sim = live.simulators[0]
        # Quadversity at a marginal level: the strongest antenna and the next one stay above the
        # receiver's red line (-85 dBm in the simulator, as the hardware's blue/red LED), the
        # farthest falls under it. None of them is at the noise floor, so red can only come from
        # the receiver's own antenna states, and more than one antenna lit only from them too.
        sim.set_rf(1, -78.0)
        await sign_in(browser_page, live)
        await open_site(browser_page, live)
        page = browser_page.page
        tile = TILE.format(index=1)
        await page.wait_for_function(
            """(tile) => {
                const states = [...document.querySelectorAll(tile + " .ant")]
                    .map((a) => a.dataset.antennaState);
                return states.length === 4
                    && states.includes("red")
                    && states.filter((s) => s === "active").length >= 2;
            }""",
            arg=tile,
            timeout=20_000,
        )
        await browser_page.shot("axient-antennas")
        # A strong signal: every antenna receiving well, none red.
        sim.set_rf(1, -50.0)
        await page.wait_for_function(
            """(tile) => [...document.querySelectorAll(tile + " .ant")]
                .every((a) => a.dataset.antennaState === "active")""",
            arg=tile,
            timeout=20_000,
        )
    finally:
        await stop_fleet(live)


@pytest.mark.load
async def test_two_hundred_channels_stay_smooth(tmp_path: Path, browser_page: BrowserPage) -> None:
    from tests.browser.conftest import start_fleet, stop_fleet, wait_for_channels

    from micboard.collector.live import Topic

    # Every tile still gets live meters, but at 2 Hz rather than 5: the browser draws them once
    # per animation frame either way, and on a loaded 2-core machine the simulators, the agent
    # and the collector share this one process. (Meters reach the page as one `meters` message
    # per tick; when they were one WebSocket message per channel and reading, 1,000 frames a
    # second could starve the collector's writer and get the page dropped as a slow client.)
    live = await start_fleet(tmp_path / "fleet", simulators=50, meter_rate_hz=2.0, meter_interval_ms=500)
    try:
        await wait_for_channels(live, 200, timeout_s=40)
        await sign_in(browser_page, live)
        await open_site(browser_page, live, tiles=200)
        page = browser_page.page
        await asyncio.sleep(1.0)  # past the first layout of 200 tiles
        # Frame times and long tasks over three seconds of live meters for every channel.
        stats = await page.evaluate(
            """() => new Promise((resolve) => {
                const longTasks = [];
                const observer = new PerformanceObserver((list) => {
                    for (const entry of list.getEntries()) longTasks.push(entry.duration);
                });
                observer.observe({ entryTypes: ["longtask"] });
                const frames = [];
                let last = performance.now();
                const end = last + 3000;
                const step = (now) => {
                    frames.push(now - last);
                    last = now;
                    if (now < end) requestAnimationFrame(step);
                    else {
                        observer.disconnect();
                        frames.sort((a, b) => a - b);
                        resolve({
                            frames: frames.length,
                            median: frames[Math.floor(frames.length / 2)],
                            p95: frames[Math.floor(frames.length * 0.95)],
                            longest: Math.max(0, ...longTasks),
                            drawn: document.querySelectorAll("#tiles .ant .fill").length,
                        });
                    }
                };
                requestAnimationFrame(step);
            })"""
        )
        await browser_page.shot("two-hundred")
        assert stats["drawn"] >= 200 * 2  # every tile has its antenna bars: meters reached all of them
        # Bounds for a small shared machine that also runs 50 simulators, the agent and the
        # collector: a jank-free page keeps most frames near 60 Hz and never stalls for long.
        assert stats["frames"] >= 60, stats
        assert stats["median"] < 50, stats
        assert stats["p95"] < 150, stats
        assert stats["longest"] < 400, stats
        # A change still reaches its tile quickly with the whole wall updating. What this test
        # times is the dashboard's part: from the moment the collector has committed the change
        # (its live hub announces the device, and the API then shows the new battery) to the
        # tile. Upstream of that, 50 simulators, the agent polling them and ingest share this
        # process and two cores with the browser; under load that part alone can take longer
        # than 2 s without the dashboard being any slower. The end-to-end 2 s on one receiver is
        # test_battery_drop_and_transmitter_off_reach_the_tile_within_2s.
        sim = live.simulators[17]
        sim.set_battery(2, bars=5)
        status, body = await live.api("GET", f"/channels?site={live.site}&limit=1000")
        assert status == 200
        item = next(c for c in body["items"] if c["device_key"].endswith(f"-{sim.port}") and c["index"] == 2)
        selector = f"#tiles .tile[data-device-id='{item['device_id']}'][data-index='2']"
        await page.wait_for_selector(f"{selector}[data-state='good']", timeout=15000)
        # A queue large enough that no announcement is dropped, however far the reader lags.
        subscription = live.collector.hub.subscribe(
            max_queue=100_000, topics=frozenset({Topic.DEVICE}), sites=frozenset({live.site})
        )
        async with subscription:
            committed = asyncio.create_task(
                committed_at(live, subscription, item["device_id"], item["device_key"], 2, "critical")
            )
            try:
                sim.set_battery(2, bars=1)
                await page.wait_for_selector(f"{selector}[data-state='critical']", timeout=30000)
                shown = time.monotonic()
                applied = await asyncio.wait_for(committed, 10.0)
            finally:
                committed.cancel()
        assert subscription.dropped == 0
        latency = shown - applied
        assert latency < 2.0, f"the tile showed it {latency:.2f} s after the commit: {live_stats(live)}"
    finally:
        await stop_fleet(live)
