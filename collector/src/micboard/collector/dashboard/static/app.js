// The fleet dashboard: routing, views, live updates and user actions.
// Views: #/fleet, #/site/<site>[/group/<id>], #/agents, #/alerts; the login form when no token works.

import { ApiError, api, getToken, handleUnauthorized, query, setToken } from "./api.js";
import { lineChart } from "./chart.js";
import { LiveConnection } from "./live.js";
import { STATE_LABELS, formatAgo, formatClock } from "./readings.js";
import { MeterScheduler, TileView, channelKey } from "./tiles.js";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

const TV_KEY = "micboard.tv";
const WORST_ORDER = { critical: 0, warning: 1, offline: 2, stale: 3, ok: 4 };
const WORST_LABELS = { critical: "Critical", warning: "Warning", offline: "Offline", stale: "Stale", ok: "OK" };
const LEGEND = [
  ["good", "Good"], ["replace", "Replace"], ["critical", "Critical"],
  ["previously_good", "Previously known"], ["unknown", "No transmitter"],
  ["offline", "Offline"], ["stale", "Stale"],
];

/** Everything the page knows; views read it, messages and fetches write it. */
const state = {
  route: { view: "fleet" },
  sites: new Map(), // site -> site summary
  tiles: new Map(), // channel key -> TileView (current site only)
  groups: [], // groups of the current site, by position
  alerts: new Map(), // id -> alert (alerts view)
  agents: new Map(), // agent -> agent (agents view)
  openAlertCount: 0,
  arranging: false,
  filter: "",
  pendingRenames: new Map(), // channel key -> requested name
};

const live = new LiveConnection(getToken, onLiveMessage, showLiveState);
const meters = new MeterScheduler((key) => state.tiles.get(key));

// ---------------------------------------------------------------------------------------
// Small shared pieces

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children);
  return node;
}

let toastTimer = 0;
function toast(message, kind = "info") {
  const box = $("#toast");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 5000);
}

function explain(error) {
  if (error instanceof ApiError) {
    if (error.status === 403) return "Not allowed: this needs the operator role.";
    if (error.status === 404) return "Not found (it may have been removed).";
    return `${error.message} (HTTP ${error.status})`;
  }
  return `Network problem: ${error.message ?? error}`;
}

// A live link down for longer than a reconnect takes: say so on the page, and dim what it
// shows, rather than let a wall screen show batteries that may have moved since.
const LINK_GRACE_MS = 3000;
let linkDownSince = 0;
let linkDownTimer = 0;

function showLiveState(value) {
  const words = { connecting: "connecting", live: "live", reconnecting: "reconnecting", closed: "offline" };
  for (const node of [$("#live-status"), $("#tv-live")]) {
    node.dataset.live = value;
    node.textContent = words[value] ?? value;
  }
  if (value === "live" || value === "closed") {
    // Live: the snapshot that came with it replaced everything shown. Closed: signed out.
    clearTimeout(linkDownTimer);
    linkDownSince = 0;
    showLinkLost(false);
  } else if (!linkDownSince) {
    linkDownSince = Date.now();
    linkDownTimer = setTimeout(() => showLinkLost(true), LINK_GRACE_MS);
  }
}

function showLinkLost(lost) {
  document.body.toggleAttribute("data-link-lost", lost);
  const banner = $("#link-lost");
  banner.hidden = !lost;
  if (lost) {
    banner.textContent = `Not live since ${formatClock(linkDownSince)}: what is shown may be out of date. ` +
      "Reconnecting…";
  }
}

function matchesFilter(text) {
  return !state.filter || text.toLowerCase().includes(state.filter);
}

// ---------------------------------------------------------------------------------------
// Routing

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "site" && parts[1]) {
    const group = parts[2] === "group" && parts[3] ? parts[3] : null;
    return { view: "site", site: parts[1], group };
  }
  if (parts[0] === "alerts") return { view: "alerts" };
  if (parts[0] === "agents") return { view: "agents" };
  return { view: "fleet" };
}

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function siteHash(site, group) {
  const base = `#/site/${encodeURIComponent(site)}`;
  return group ? `${base}/group/${encodeURIComponent(group)}` : base;
}

function showView(name) {
  for (const view of $$(".view")) view.hidden = view.id !== `view-${name}`;
  document.body.dataset.view = name;
  for (const link of $$("#topbar .nav")) {
    link.classList.toggle("current", link.id === `nav-${name}`);
  }
}

function renderCrumbs() {
  const crumbs = $("#crumbs");
  const items = [el("a", { href: "#/fleet", text: "Fleet" })];
  if (state.route.view === "site") items.push(el("span", { text: state.route.site }));
  if (state.route.view === "alerts") items.push(el("span", { text: "Alerts" }));
  if (state.route.view === "agents") items.push(el("span", { text: "Agents" }));
  crumbs.replaceChildren(...items.flatMap((item, i) => (i ? [el("i", { text: "/" }), item] : [item])));
  $("#tv-title").textContent = state.route.view === "site" ? state.route.site : "Fleet";
}

async function route() {
  if (!getToken()) {
    showLogin();
    return;
  }
  document.body.dataset.auth = "in";
  if (!document.body.dataset.role) await loadSession();
  const previous = state.route;
  state.route = parseRoute();
  renderCrumbs();
  if (state.route.view !== "site" || previous.view !== "site" || previous.site !== state.route.site) {
    state.arranging = false;
  }
  try {
    if (state.route.view === "site") await enterSite(previous);
    else if (state.route.view === "alerts") await enterAlerts();
    else if (state.route.view === "agents") await enterAgents();
    else await enterFleet();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) toast(explain(error), "error");
  }
  refreshAlertCount();
}

// ---------------------------------------------------------------------------------------
// Login

/** Learn the token's role: controls it does not allow are hidden (the API refuses them anyway). */
async function loadSession(token = getToken()) {
  try {
    showSession(await api("/session", { token }));
  } catch (error) {
    // Without a role every guarded control stays hidden; a 401 signs out through the handler.
    if (!(error instanceof ApiError && error.status === 401)) toast(explain(error), "error");
  }
}

function showSession(me) {
  document.body.dataset.role = me.role;
  $("#btn-logout").title = `Signed in as ${me.name} (${me.role})`;
}

function showLogin(message) {
  live.stop();
  document.body.dataset.auth = "out";
  delete document.body.dataset.role;
  showView("login");
  const error = $("#login-error");
  error.hidden = !message;
  error.textContent = message ?? "";
  $("#login-token").focus();
}

async function onLogin(event) {
  event.preventDefault();
  const token = $("#login-token").value.trim();
  if (!token) return;
  const button = $("#login-submit");
  button.disabled = true;
  try {
    const me = await api("/session", { token });
    setToken(token);
    showSession(me);
    $("#login-token").value = "";
    route();
  } catch (error) {
    const text = error instanceof ApiError && error.status === 401
      ? "That token was not accepted."
      : explain(error);
    showLogin(text);
  } finally {
    button.disabled = false;
  }
}

handleUnauthorized(() => {
  setToken(null);
  showLogin("Your session ended: sign in again.");
});

// ---------------------------------------------------------------------------------------
// Fleet view

// The fleet, agents and alerts views show sites and lists: no channel and no live level.
const FLEET_SUMMARY = { scope: "fleet", channels: false, meters: false };

async function enterFleet() {
  showView("fleet");
  live.start(FLEET_SUMMARY);
  const body = await api(`/sites${query({ limit: 1000 })}`);
  state.sites.clear();
  for (const item of body.items ?? []) state.sites.set(item.site, item);
  renderFleet();
}

function sortedSites() {
  // The server sends worst first; live updates may change that, so sort here too.
  return [...state.sites.values()].sort((a, b) =>
    (WORST_ORDER[a.worst] ?? 9) - (WORST_ORDER[b.worst] ?? 9)
    || (b.open_alerts ?? 0) - (a.open_alerts ?? 0)
    || String(a.site).localeCompare(String(b.site)));
}

// Live updates must not replace the element under the user's pointer: a click whose mousedown
// and mouseup land on different (replaced) elements is lost. Lists keep each item's element,
// change it in place, and move nodes only when the order or the set changes.
/** The row kept in `cache` under `key` while its item's `signature` is the same, else `build()`'s. */
function keptRow(cache, key, signature, build) {
  const kept = cache.get(key);
  if (kept && kept.signature === signature) return kept.row;
  const row = build();
  cache.set(key, { row, signature });
  return row;
}

function placeInOrder(container, nodes) {
  const current = container.children;
  if (current.length !== nodes.length || nodes.some((node, i) => current[i] !== node)) {
    container.replaceChildren(...nodes);
  }
}

const SITE_STATS = [["Online", "online"], ["Offline", "offline"], ["Stale", "stale"], ["Channels", "channels"], ["Alerts", "alerts"]];

function siteCard(site) {
  return el("a", { class: "site-card card", href: siteHash(site), "data-site": site },
    el("div", { class: "site-card-head" },
      el("span", { class: "site-name", text: site }),
      el("span", { class: "worst" })),
    el("dl", { class: "stats" }, ...SITE_STATS.map(([label, kind]) =>
      el("div", { class: `stat ${kind}`, "data-stat": kind }, el("dt", { text: label }), el("dd")))),
    el("div", { class: "seen" }));
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function fillSiteCard(card, item) {
  const devices = item.devices ?? {};
  const values = {
    online: devices.online, offline: devices.offline, stale: devices.stale,
    channels: item.channels, alerts: item.open_alerts,
  };
  card.dataset.worst = item.worst ?? "ok";
  setText(card.querySelector(".worst"), WORST_LABELS[item.worst] ?? item.worst ?? "OK");
  for (const [, kind] of SITE_STATS) {
    setText(card.querySelector(`[data-stat='${kind}'] dd`), String(values[kind] ?? 0));
  }
  setText(card.querySelector(".seen"), `last seen ${formatAgo(item.last_seen_ms)}`);
  return card;
}

const siteCards = new Map();

function renderFleet() {
  if (state.route.view !== "fleet") return;
  const shown = sortedSites().filter((item) => matchesFilter(item.site));
  const cards = shown.map((item) => {
    let card = siteCards.get(item.site);
    if (!card) siteCards.set(item.site, (card = siteCard(item.site)));
    return fillSiteCard(card, item);
  });
  for (const site of siteCards.keys()) if (!state.sites.has(site)) siteCards.delete(site);
  placeInOrder($("#site-list"), cards);
  $("#fleet-empty").hidden = state.sites.size > 0;
  const sum = (fn) => [...state.sites.values()].reduce((total, item) => total + (fn(item) ?? 0), 0);
  const totals = [
    ["Sites", state.sites.size],
    ["Online", sum((s) => s.devices?.online)],
    ["Offline", sum((s) => s.devices?.offline)],
    ["Stale", sum((s) => s.devices?.stale)],
    ["Channels", sum((s) => s.channels)],
    // Open or acknowledged (the API's open_alerts); the header's badge counts those not yet acknowledged.
    ["Alerts in force", sum((s) => s.open_alerts)],
  ];
  $("#fleet-totals").replaceChildren(...totals.map(([label, value]) =>
    el("div", { class: "total", "data-total": label.toLowerCase().replaceAll(" ", "-") },
      el("strong", { text: String(value) }), el("span", { text: label }))));
}

let fleetRenderQueued = false;
function queueFleetRender() {
  // Many site messages can arrive together; one render per frame is plenty for a handful of cards.
  if (fleetRenderQueued) return;
  fleetRenderQueued = true;
  requestAnimationFrame(() => {
    fleetRenderQueued = false;
    renderFleet();
  });
}

// ---------------------------------------------------------------------------------------
// Site view: tiles, groups, arranging

async function enterSite(previous) {
  showView("site");
  const site = state.route.site;
  $("#site-title").textContent = site;
  const sameSite = previous.view === "site" && previous.site === site && state.tiles.size > 0;
  if (!sameSite) {
    state.tiles.clear();
    $("#tiles").replaceChildren();
    $("#tiles-others").replaceChildren();
    $("#site-empty").hidden = true;
    live.start({ scope: "site", site });
    const [channels, groups] = await Promise.all([
      api(`/channels${query({ site, limit: 1000 })}`),
      api("/groups").catch((error) => {
        if (error instanceof ApiError && error.status === 401) throw error;
        toast(`Groups unavailable: ${explain(error)}`, "error");
        return { items: [] };
      }),
    ]);
    for (const channel of channels.items ?? []) upsertChannel(channel, false);
    setGroups(groups);
  } else {
    live.start({ scope: "site", site });
  }
  layoutTiles();
}

function setGroups(body) {
  const items = Array.isArray(body) ? body : body?.items ?? [];
  state.groups = items
    .filter((group) => group.site === state.route.site || group.site === null || group.site === undefined)
    .sort((a, b) => (a.position ?? 0) - (b.position ?? 0) || a.id - b.id);
}

function currentGroup() {
  const id = state.route.group;
  return id ? state.groups.find((group) => String(group.id) === String(id)) ?? null : null;
}

function compareTiles(a, b) {
  const ca = a.channel;
  const cb = b.channel;
  return String(ca.device_name ?? ca.device_key ?? "").localeCompare(String(cb.device_name ?? cb.device_key ?? ""))
    || String(ca.device_id).localeCompare(String(cb.device_id))
    || ca.index - cb.index;
}

function tileText(view) {
  const c = view.channel;
  return [c.name, c.name_id, c.name_person, c.device_name, c.model, c.device_key, c.tx?.model,
    view.parts.freq.textContent].filter(Boolean).join(" ");
}

/** Put tiles into the grid in the order of the current group (moving nodes, never rebuilding). */
function layoutTiles() {
  if (state.route.view !== "site") return;
  const group = currentGroup();
  if (state.route.group && !group && state.groups.length) {
    go(siteHash(state.route.site));
    return;
  }
  renderGroupTabs(group);
  const main = $("#tiles");
  const others = $("#tiles-others");
  let inGroup;
  let rest;
  if (group) {
    const keys = group.channels.map((c) => channelKey(c.device_id, c.index));
    inGroup = keys.map((key) => state.tiles.get(key)).filter(Boolean);
    const taken = new Set(keys);
    rest = [...state.tiles.values()].filter((view) => !taken.has(view.key)).sort(compareTiles);
  } else {
    inGroup = [...state.tiles.values()].sort(compareTiles);
    rest = [];
  }
  const showOthers = Boolean(group && state.arranging);
  // Nodes move in one go (one layout afterwards), and not at all when nothing moved: a
  // snapshot after a reconnect leaves the tiles under the pointer where they are.
  const place = (container, views) => placeInOrder(container, views.map((view) => view.root));
  place(main, inGroup);
  place(others, showOthers ? rest : []);
  others.hidden = !showOthers;
  $("#others-head").hidden = !showOthers;
  document.body.dataset.arranging = state.arranging && group ? "true" : "false";
  $("#arrange-bar").hidden = !(state.arranging && group);
  $("#arrange-name").textContent = group?.name ?? "";
  $("#btn-arrange").setAttribute("aria-pressed", String(state.arranging));
  $("#btn-arrange").hidden = !group;
  $("#site-empty").hidden = state.tiles.size > 0;
  applyTileFilter();
}

function renderGroupTabs(group) {
  const tabs = [el("a", {
    href: siteHash(state.route.site), role: "tab", class: "tab", "data-group": "",
    "aria-selected": String(!group), text: "All channels",
  })];
  for (const item of state.groups) {
    tabs.push(el("a", {
      href: siteHash(state.route.site, item.id), role: "tab", class: "tab", "data-group": item.id,
      "aria-selected": String(group?.id === item.id),
    }, item.name, el("small", { text: String(item.channels?.length ?? 0) })));
  }
  $("#group-tabs").replaceChildren(...tabs);
}

function applyTileFilter() {
  for (const view of state.tiles.values()) {
    const hide = !matchesFilter(tileText(view));
    if (view.root.hidden !== hide) view.root.hidden = hide;
  }
}

/** Add or update one channel's tile; new tiles are laid out on the next frame. */
function upsertChannel(channel, fromLive = true) {
  if (state.route.view !== "site" || channel.site !== state.route.site) return;
  const key = channelKey(channel.device_id, channel.index);
  let view = state.tiles.get(key);
  if (!view) {
    view = new TileView($("#tpl-tile"), channel);
    state.tiles.set(key, view);
    if (fromLive) queueLayout();
  }
  view.update(channel);
  const wanted = state.pendingRenames.get(key);
  if (wanted !== undefined && channel.name === wanted) {
    state.pendingRenames.delete(key);
    view.say(`Renamed to “${wanted}”`, "ok");
  }
}

let layoutQueued = false;
function queueLayout() {
  if (layoutQueued) return;
  layoutQueued = true;
  requestAnimationFrame(() => {
    layoutQueued = false;
    layoutTiles();
  });
}

function groupBody(group, channels) {
  return {
    name: group.name,
    site: group.site ?? state.route.site,
    channels: channels.map((c) => ({ device_id: c.device_id, index: c.index })),
    position: group.position ?? 0,
  };
}

async function saveGroup(group, changes) {
  const body = { ...groupBody(group, group.channels), ...changes };
  try {
    const saved = await api(`/groups/${encodeURIComponent(group.id)}`, { method: "PUT", body });
    Object.assign(group, saved && saved.id !== undefined ? saved : body);
  } catch (error) {
    toast(`Group not saved: ${explain(error)}`, "error");
    setGroups(await api("/groups"));
  }
  state.groups.sort((a, b) => (a.position ?? 0) - (b.position ?? 0) || a.id - b.id);
  layoutTiles();
}

async function arrangeTile(view, action) {
  const group = currentGroup();
  if (!group) return;
  const channels = [...group.channels];
  const at = channels.findIndex((c) => channelKey(c.device_id, c.index) === view.key);
  if (action === "add" && at < 0) channels.push({ device_id: view.channel.device_id, index: view.channel.index });
  else if (action === "remove" && at >= 0) channels.splice(at, 1);
  else if ((action === "left" || action === "right") && at >= 0) {
    const to = action === "left" ? at - 1 : at + 1;
    if (to < 0 || to >= channels.length) return;
    [channels[at], channels[to]] = [channels[to], channels[at]];
  } else return;
  await saveGroup(group, { channels });
  view.root.focus();
}

async function moveGroup(step) {
  const group = currentGroup();
  if (!group) return;
  const order = [...state.groups];
  const at = order.indexOf(group);
  const to = at + step;
  if (to < 0 || to >= order.length) return;
  [order[at], order[to]] = [order[to], order[at]];
  // Positions are rewritten densely so that the order survives any earlier duplicates.
  const changed = order.map((item, position) => ({ item, position })).filter(({ item, position }) =>
    item.position !== position);
  for (const { item, position } of changed) await saveGroup(item, { position });
}

function openGroupDialog(mode) {
  const dialog = $("#group-dialog");
  dialog.dataset.mode = mode;
  $("#group-dialog-title").textContent = mode === "rename" ? "Rename group" : "New group";
  $("#group-name").value = mode === "rename" ? currentGroup()?.name ?? "" : "";
  dialog.showModal();
  $("#group-name").focus();
}

async function onGroupSubmit(event) {
  event.preventDefault();
  const dialog = $("#group-dialog");
  const name = $("#group-name").value.trim();
  if (!name) return;
  dialog.close();
  if (dialog.dataset.mode === "rename") {
    const group = currentGroup();
    if (group) await saveGroup(group, { name });
    return;
  }
  try {
    const position = state.groups.reduce((max, g) => Math.max(max, (g.position ?? 0) + 1), 0);
    const created = await api("/groups", {
      method: "POST", body: { name, site: state.route.site, channels: [], position },
    });
    state.groups.push(created);
    state.arranging = true;
    go(siteHash(state.route.site, created.id));
  } catch (error) {
    toast(`Group not created: ${explain(error)}`, "error");
  }
}

async function deleteGroup() {
  const group = currentGroup();
  if (!group || !window.confirm(`Delete the group “${group.name}”? The channels stay.`)) return;
  try {
    await api(`/groups/${encodeURIComponent(group.id)}`, { method: "DELETE" });
    state.groups = state.groups.filter((item) => item !== group);
    state.arranging = false;
    go(siteHash(state.route.site));
  } catch (error) {
    toast(`Group not deleted: ${explain(error)}`, "error");
  }
}

// ---------------------------------------------------------------------------------------
// Tile actions: rename, identify, history

function openRename(view) {
  const form = view.parts.renameForm;
  form.hidden = false;
  const input = form.elements.name;
  input.value = view.channel.name ?? "";
  input.focus();
  input.select();
}

function closeRename(view) {
  view.parts.renameForm.hidden = true;
}

async function sendCommand(view, action, value) {
  const { device_id: deviceId, index } = view.channel;
  const body = { action, channel: index };
  if (value !== undefined) body.value = value;
  return api(`/devices/${encodeURIComponent(deviceId)}/commands`, { method: "POST", body });
}

async function onRename(view, event) {
  event.preventDefault();
  const value = view.parts.renameForm.elements.name.value.trim();
  if (!value) {
    view.say("Not renamed: a name must not be blank", "error");
    return;
  }
  closeRename(view);
  view.say("Sending to the receiver…", "info", 0);
  try {
    const reply = await sendCommand(view, "rename", value);
    if (reply?.outcome === "ok") {
      // The tile changes when the receiver reports the new name through the live flow.
      state.pendingRenames.set(view.key, value);
      view.say(view.channel.name === value ? "Renamed" : "Accepted — waiting for the receiver…", "ok",
        view.channel.name === value ? 6000 : 15000);
    } else {
      view.say(`Not renamed: ${reply?.outcome ?? "error"}${reply?.detail ? ` — ${reply.detail}` : ""}`, "error");
    }
  } catch (error) {
    view.say(`Not renamed: ${explain(error)}`, "error");
  }
}

async function onIdentify(view) {
  view.say("Identifying…", "info", 0);
  try {
    const reply = await sendCommand(view, "identify");
    view.say(reply?.outcome === "ok" ? "The receiver is flashing" : `Identify: ${reply?.outcome}`,
      reply?.outcome === "ok" ? "ok" : "error");
  } catch (error) {
    view.say(`Identify failed: ${explain(error)}`, "error");
  }
}

let historyView = null;
async function openHistory(view, hours = 1) {
  historyView = view;
  const dialog = $("#history-dialog");
  const c = view.channel;
  $("#history-title").textContent = `${c.name ?? `Channel ${c.index}`} — ${c.device_name ?? c.model ?? ""} ch ${c.index}`;
  for (const button of $$("#history-range button")) {
    button.setAttribute("aria-selected", String(Number(button.dataset.hours) === hours));
  }
  const charts = $("#history-charts");
  charts.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
  if (!dialog.open) dialog.showModal();
  const toMs = Date.now();
  const fromMs = toMs - hours * 3600_000;
  // About 240 points per chart, in whole minutes: history is kept in 60 s buckets.
  const resolution = Math.max(60, Math.round((hours * 3600) / 240 / 60) * 60);
  try {
    const body = await api(`/devices/${encodeURIComponent(c.device_id)}/channels/${c.index}/history${
      query({ from_ms: fromMs, to_ms: toMs, resolution_s: resolution })}`);
    if (historyView !== view) return;
    const items = body.items ?? [];
    const battery = items.map((p) => ({ t: p.ts_ms, v: p.battery_percent ?? null }));
    const rf = items.map((p) => ({ t: p.ts_ms, v: p.rf_dbm ?? null, lo: p.rf_dbm_min ?? null }));
    charts.replaceChildren(
      lineChart(battery, { title: "Battery %", unit: "%", yMin: 0, yMax: 100, fromMs, toMs, cssClass: "battery-chart" }),
      lineChart(rf, {
        title: "RF dBm (thin line: the weakest reading)", unit: "", yMin: -100, yMax: -20, fromMs, toMs,
        cssClass: "rf-chart",
      }),
    );
  } catch (error) {
    charts.replaceChildren(el("p", { class: "error", text: `History unavailable: ${explain(error)}` }));
  }
}

function removeDeviceTiles(item) {
  let removed = false;
  for (const [key, view] of [...state.tiles.entries()]) {
    const c = view.channel;
    if (c && c.agent === item.agent && c.device_key === item.device_key) {
      state.tiles.delete(key);
      removed = true;
    }
  }
  if (removed) queueLayout();
}

async function onForget(view) {
  const c = view.channel;
  const label = `${c.device_name ?? c.model ?? c.device_key} (${c.device_key})`;
  if (!window.confirm(`Forget ${label}? Its tiles and open alerts go; its history stays. ` +
    "If its agent reports it again it comes back as a new receiver.")) return;
  try {
    await api(`/devices/${encodeURIComponent(c.device_id)}`, { method: "DELETE" });
    toast(`Forgot ${label}`, "ok");
    removeDeviceTiles(c);
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) view.say("Not allowed: this needs the admin role.", "error");
    else view.say(`Not forgotten: ${explain(error)}`, "error");
  }
}

function onTileClick(event) {
  const button = event.target.closest("button[data-act]");
  const tile = event.target.closest(".tile");
  if (!button || !tile) return;
  const view = state.tiles.get(tile.dataset.key);
  if (!view) return;
  const act = button.dataset.act;
  if (act === "rename") openRename(view);
  else if (act === "rename-cancel") closeRename(view);
  else if (act === "history") openHistory(view);
  else if (act === "identify") onIdentify(view);
  else if (act === "forget") onForget(view);
  else arrangeTile(view, act);
}

function onTileSubmit(event) {
  const tile = event.target.closest(".tile");
  const view = tile && state.tiles.get(tile.dataset.key);
  if (view && event.target.matches(".rename-form")) onRename(view, event);
}

// ---------------------------------------------------------------------------------------
// Alerts

async function enterAlerts() {
  showView("alerts");
  live.start(FLEET_SUMMARY);
  await loadAlerts();
}

const ALERTS_SHOWN = 500;

async function loadAlerts() {
  const wanted = $("#alert-state").value;
  const body = await api(`/alerts${query({ state: wanted, limit: ALERTS_SHOWN })}`);
  state.alerts.clear();
  for (const item of body.items ?? []) {
    state.alerts.set(item.id, item);
    rememberAlertLabels(item);
  }
  // Say so when the list is cut: the newest are shown, the older ones are in the API.
  const total = body.total ?? 0;
  const more = $("#alerts-more");
  more.hidden = total <= (body.items ?? []).length;
  more.textContent = `The newest ${ALERTS_SHOWN} of ${total} alerts are shown.`;
  renderAlerts();
}

// What receivers and channels are called, as alert listings said: live alert messages carry
// only their keys.
const alertLabels = new Map();

function rememberAlertLabels(item) {
  const device = `${item.agent}/${item.device_key}`;
  if (item.device_name) alertLabels.set(device, item.device_name);
  if (item.channel_name) alertLabels.set(`${device}/${item.channel}`, item.channel_name);
}

/** "ULXD4D · HH01 Ana" rather than the receiver's key and channel number (kept in the title). */
function alertPlace(alert) {
  if (!alert.device_key) return { text: "", title: "" };
  const device = `${alert.agent}/${alert.device_key}`;
  const name = alert.device_name ?? alertLabels.get(device) ?? alert.device_key;
  const channel = alert.channel
    ? alert.channel_name ?? alertLabels.get(`${device}/${alert.channel}`) ?? `ch ${alert.channel}`
    : "";
  const title = `${alert.device_key}${alert.channel ? ` ch ${alert.channel}` : ""}`;
  return { text: channel ? `${name} · ${channel}` : name, title };
}

function alertRow(alert) {
  const place = alertPlace(alert);
  const actions = el("td", { class: "actions" });
  if (alert.state === "open") {
    actions.append(el("button", {
      type: "button", "data-act": "acknowledge", "data-needs": "operator", class: "ghost", text: "Acknowledge",
    }));
  }
  if (alert.state !== "resolved") {
    actions.append(el("button", {
      type: "button", "data-act": "resolve", "data-needs": "operator", class: "ghost", text: "Resolve",
    }));
  }
  const who = alert.state === "acknowledged" && alert.acknowledged_by ? ` by ${alert.acknowledged_by}`
    : alert.state === "resolved" && alert.resolved_by ? ` by ${alert.resolved_by}` : "";
  return el("tr", { "data-alert-id": alert.id, "data-severity": alert.severity, "data-state": alert.state },
    el("td", {}, el("span", { class: "sev", text: alert.severity })),
    el("td", {}, el("a", { href: siteHash(alert.site), text: alert.site })),
    el("td", { text: place.text, title: place.title }),
    el("td", {}, el("strong", { text: alert.message ?? alert.rule }), el("small", { text: alert.rule })),
    el("td", { class: "opened", title: new Date(alert.opened_ms).toISOString() }),
    el("td", { class: "state", text: `${alert.state}${who}` }),
    actions);
}

const alertRows = new Map(); // alert id -> { row, signature }: a row is rebuilt only when it changed

function renderAlerts() {
  if (state.route.view !== "alerts") return;
  const order = { critical: 0, warning: 1, info: 2 };
  const alerts = [...state.alerts.values()]
    .filter((a) => matchesFilter([a.site, a.device_key, a.rule, a.message, a.severity].join(" ")))
    .sort((a, b) => (order[a.severity] ?? 9) - (order[b.severity] ?? 9) || b.opened_ms - a.opened_ms);
  const rows = alerts.map((alert) => keptRow(alertRows, alert.id, JSON.stringify(alert), () => alertRow(alert)));
  alerts.forEach((alert, i) => {
    setText(rows[i].querySelector("td.opened"), `${formatClock(alert.opened_ms)} · ${formatAgo(alert.opened_ms)}`);
  });
  for (const id of alertRows.keys()) if (!state.alerts.has(id)) alertRows.delete(id);
  placeInOrder($("#alert-rows"), rows);
  $("#alert-table").hidden = state.alerts.size === 0;
  $("#alerts-empty").hidden = rows.length > 0;
}

async function onAlertAction(event) {
  const button = event.target.closest("button[data-act]");
  const row = event.target.closest("tr[data-alert-id]");
  if (!button || !row) return;
  const id = row.dataset.alertId;
  const act = button.dataset.act;
  button.disabled = true;
  try {
    const reply = await api(`/alerts/${encodeURIComponent(id)}/${act}`, { method: "POST" });
    const alert = state.alerts.get(Number(id)) ?? state.alerts.get(id);
    const updated = reply && reply.id !== undefined ? reply
      : { ...alert, state: act === "acknowledge" ? "acknowledged" : "resolved" };
    onAlert(updated);
    toast(act === "acknowledge" ? "Alert acknowledged" : "Alert resolved", "ok");
  } catch (error) {
    button.disabled = false;
    toast(explain(error), "error");
  }
}

function onAlert(alert) {
  if (state.route.view === "alerts") {
    const wanted = $("#alert-state").value;
    if (!wanted || alert.state === wanted) state.alerts.set(alert.id, alert);
    else state.alerts.delete(alert.id);
    renderAlerts();
  }
  refreshAlertCount();
}

let countTimer = 0;
function refreshAlertCount() {
  // Coalesce bursts of alert messages into one request.
  clearTimeout(countTimer);
  countTimer = setTimeout(async () => {
    if (!getToken()) return;
    try {
      const body = await api(`/alerts${query({ state: "open", limit: 1 })}`);
      setAlertCount(body.total ?? body.items?.length ?? 0);
    } catch {
      // The badge is a convenience; the alerts view reports errors.
    }
  }, 250);
}

function setAlertCount(count) {
  state.openAlertCount = count;
  const badge = $("#alert-count");
  badge.textContent = String(count);
  badge.dataset.count = String(count);
  badge.hidden = false; // hidden until the first count: a "0" before it would be a guess
}

// ---------------------------------------------------------------------------------------
// Live messages

function onLiveMessage(message) {
  switch (message.type) {
    case "snapshot":
      for (const site of message.sites ?? []) state.sites.set(site.site, site);
      if (state.route.view === "fleet") queueFleetRender();
      if (state.route.view === "site") {
        const seen = new Set();
        for (const channel of message.channels ?? []) {
          upsertChannel(channel);
          seen.add(channelKey(channel.device_id, channel.index));
        }
        // A snapshot is the whole truth of its scope: channels it lacks are gone.
        for (const key of [...state.tiles.keys()]) {
          if (!seen.has(key) && state.tiles.get(key).channel?.site === state.route.site) state.tiles.delete(key);
        }
        queueLayout();
      }
      break;
    case "channel":
      if (message.item) upsertChannel(message.item);
      break;
    case "site_removed":
      // A retired venue (its last agent forgotten): its card goes from the fleet view.
      if (message.item && state.sites.delete(message.item.site) && state.route.view === "fleet") queueFleetRender();
      break;
    case "device_removed":
      // A receiver forgotten by an admin: its tiles go wherever they are shown.
      if (message.item) removeDeviceTiles(message.item);
      break;
    case "channel_removed":
      // A receiver now reports fewer channels (reconfigured or replaced): that tile goes.
      if (message.item && state.tiles.delete(channelKey(message.item.device_id, message.item.index))) queueLayout();
      break;
    case "meters":
      // One message per server tick with the latest reading of each channel that moved.
      for (const reading of message.items ?? []) meters.push(reading);
      break;
    case "site":
      if (message.item) {
        state.sites.set(message.item.site, message.item);
        if (state.route.view === "fleet") queueFleetRender();
      }
      break;
    case "alert":
      if (message.item) onAlert(message.item);
      break;
    case "unauthorized":
      setToken(null);
      showLogin("Your session ended: sign in again.");
      break;
    default:
      break; // newer servers may send more; ignore what we do not know
  }
}

// ---------------------------------------------------------------------------------------
// A site's thresholds: what makes a battery replace or critical (tiles and alerts alike)

// [name, label, step, shown under "More thresholds", min, max]: every threshold the API takes,
// with the range it accepts, so that the browser refuses a value out of range at its field.
const THRESHOLD_FIELDS = [
  ["battery_replace_bars", "Replace at bars ≤", 1, false, 0, 5],
  ["battery_critical_bars", "Critical at bars ≤", 1, false, 0, 5],
  ["battery_replace_percent", "Replace at % ≤", 1, false, 0, 100],
  ["battery_critical_percent", "Critical at % ≤", 1, false, 0, 100],
  ["rf_min_dbm", "RF lost under dBm", 0.5, false, -130, 0],
  ["clip_dbfs", "Clipping at dBFS ≥", 0.1, false, -60, 0],
  ["battery_margin_percent", "Battery clears % above", 1, true, 0, 50],
  ["battery_unknown_keep_s", "Unknown battery kept for s", 1, true, 0, 604800],
  ["rf_margin_db", "RF clears dB above", 0.5, true, 0, 30],
  ["rf_loss_s", "RF lost for s", 0.5, true, 0, 3600],
  ["clip_margin_db", "Clipping clears dB below", 0.1, true, 0, 30],
  ["clip_resolve_hold_s", "Clipping resolves after s", 1, true, 0, 3600],
  ["resolve_hold_s", "Battery and RF resolve after s", 1, true, 0, 86400],
  ["agent_stale_intervals", "Agent stale after heartbeats", 1, true, 1, 1000],
  ["agent_offline_s", "Agent offline after s", 1, true, 1, 2592000],
];

/** An API message with each threshold's name replaced by its label in the dialog. */
function withThresholdLabels(text) {
  // Longest names first: "resolve_hold_s" is part of "clip_resolve_hold_s".
  const fields = [...THRESHOLD_FIELDS].sort((a, b) => b[0].length - a[0].length);
  return fields.reduce((out, [name, label]) => out.replaceAll(name, `“${label}”`), text);
}
let thresholdsShown = null; // { site, overrides, inForce, defaults } while the dialog is open

async function openThresholds() {
  const site = state.route.site;
  try {
    const mine = await api(`/thresholds${query({ site })}`);
    thresholdsShown = {
      site, overrides: mine.overrides ?? {}, inForce: mine.in_force ?? {}, defaults: mine.defaults ?? {},
    };
  } catch (error) {
    toast(`Thresholds unavailable: ${explain(error)}`, "error");
    return;
  }
  $("#thresholds-title").textContent = `Thresholds of ${site}`;
  $("#thresholds-error").hidden = true;
  const field = ([name, label, step, , min, max]) => {
    const own = name in thresholdsShown.overrides;
    const input = el("input", {
      id: `threshold-${name}`, name, type: "number", step, min, max, required: true,
      value: String(thresholdsShown.inForce[name]),
    });
    return [
      el("label", { for: input.id, text: label }),
      input,
      el("small", own ? { "data-own": "1", text: "this site" } : { text: "default" }),
    ];
  };
  const more = THRESHOLD_FIELDS.filter((f) => f[3]);
  const details = el("details", { id: "thresholds-more" },
    el("summary", { text: "More thresholds" }),
    el("div", { class: "threshold-fields" }, ...more.flatMap(field)));
  // Open when the site has one of them of its own: what is changed is never out of sight.
  details.open = more.some(([name]) => name in thresholdsShown.overrides);
  $("#thresholds-fields").replaceChildren(...THRESHOLD_FIELDS.filter((f) => !f[3]).flatMap(field), details);
  $("#thresholds-dialog").showModal();
}

async function saveThresholds(event, { allDefaults = false } = {}) {
  event.preventDefault();
  const shown = thresholdsShown;
  if (!shown) return;
  const values = {};
  const reset = [];
  for (const [name] of THRESHOLD_FIELDS) {
    const value = Number($(`#threshold-${name}`).value);
    if (allDefaults || value === shown.defaults[name]) {
      if (name in shown.overrides) reset.push(name);
    } else if (value !== shown.inForce[name] || name in shown.overrides) {
      values[name] = value;
    }
  }
  try {
    await api("/thresholds", { method: "PUT", body: { site: shown.site, values, reset } });
  } catch (error) {
    const box = $("#thresholds-error");
    box.textContent = error instanceof ApiError && error.status === 403
      ? "Not allowed: changing thresholds needs the admin role." : withThresholdLabels(explain(error));
    box.hidden = false;
    return;
  }
  $("#thresholds-dialog").close();
  // The server sends the tiles whose state moved to the views it serves; other collector
  // processes' views and alert rules follow within 5 s.
  toast(`Thresholds of ${shown.site} saved`, "ok");
}

// ---------------------------------------------------------------------------------------
// Agents: the venue boxes, how they are doing, and retiring one that is gone for good

// Agents send no live messages of their own (their heartbeats move only "last heard"), so
// the list is fetched again while it is shown.
const AGENTS_REFRESH_MS = 5000;
const AGENT_ORDER = { stale: 0, offline: 1, online: 2 };
let agentsTimer = 0;
const agentRows = new Map(); // agent -> { row, signature }

async function enterAgents() {
  showView("agents");
  live.start(FLEET_SUMMARY);
  await loadAgents();
}

async function loadAgents() {
  clearTimeout(agentsTimer);
  if (state.route.view !== "agents") return;
  try {
    const items = [];
    for (let offset = 0; ; offset += 1000) {
      const body = await api(`/agents${query({ limit: 1000, offset, sort: "site" })}`);
      const page = body.items ?? [];
      items.push(...page);
      if (!page.length || items.length >= (body.total ?? 0)) break;
    }
    state.agents = new Map(items.map((item) => [item.agent, item]));
    $("#agents-updated").textContent = `updated ${formatClock(Date.now())}`;
    renderAgents();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    // Shown where the time of the last update was: the list stays, marked as not current.
    $("#agents-updated").textContent = `not updated: ${explain(error)}`;
  } finally {
    if (state.route.view === "agents" && getToken()) agentsTimer = setTimeout(loadAgents, AGENTS_REFRESH_MS);
  }
}

function outboxText(agent) {
  const queued = `${agent.outbox_depth ?? 0} queued`;
  return agent.dropped ? `${queued} · ${agent.dropped} dropped` : queued;
}

function receiversText(agent) {
  const counts = agent.devices ?? {};
  const parts = ["online", "offline", "stale"].filter((state) => counts[state]).map((state) => `${counts[state]} ${state}`);
  return parts.length ? parts.join(" · ") : "none";
}

function agentRow(agent) {
  const actions = el("td", { class: "actions" });
  if (agent.status !== "online") {
    actions.append(el("button", {
      type: "button", "data-act": "forget", "data-needs": "admin", class: "ghost",
      title: "Remove this agent and its receivers (admin; not while it reports)", text: "Forget",
    }));
  }
  return el("tr", { "data-agent": agent.agent, "data-status": agent.status, "data-dropped": agent.dropped > 0 },
    el("td", {}, el("span", { class: "sev", text: agent.status })),
    el("td", {}, el("a", { href: siteHash(agent.site), text: agent.site })),
    el("td", {}, el("strong", { text: agent.agent }), el("small", { text: agent.hostname ?? "" })),
    el("td", { class: "receivers", "data-label": "Receivers", text: receiversText(agent),
      "data-offline": (agent.devices?.offline ?? 0) > 0 }),
    el("td", { "data-label": "Version", text: agent.version ?? "—" }),
    el("td", { class: "started", "data-label": "Started",
      title: agent.started_ms ? new Date(agent.started_ms).toISOString() : "" }),
    el("td", { class: "heard", "data-label": "Last heard", title: new Date(agent.last_seen_ms).toISOString() }),
    el("td", { class: "outbox", "data-label": "Outbox", text: outboxText(agent) }),
    actions);
}

function renderAgents() {
  if (state.route.view !== "agents") return;
  const agents = [...state.agents.values()]
    .filter((a) => matchesFilter([a.agent, a.site, a.hostname, a.version, a.status].join(" ")))
    .sort((a, b) => (AGENT_ORDER[a.status] ?? 9) - (AGENT_ORDER[b.status] ?? 9)
      || String(a.site).localeCompare(String(b.site)) || String(a.agent).localeCompare(String(b.agent)));
  const rows = agents.map((agent) => {
    const { last_seen_ms: _moving, ...shown } = agent; // "last heard" is updated in place below
    return keptRow(agentRows, agent.agent, JSON.stringify(shown), () => agentRow(agent));
  });
  agents.forEach((agent, i) => {
    setText(rows[i].querySelector("td.started"), agent.started_ms ? formatAgo(agent.started_ms) : "—");
    setText(rows[i].querySelector("td.heard"), formatAgo(agent.last_seen_ms));
  });
  for (const name of agentRows.keys()) if (!state.agents.has(name)) agentRows.delete(name);
  placeInOrder($("#agent-rows"), rows);
  $("#agent-table").hidden = state.agents.size === 0;
  $("#agents-empty").hidden = state.agents.size > 0;
}

async function onAgentAction(event) {
  const button = event.target.closest("button[data-act='forget']");
  const row = event.target.closest("tr[data-agent]");
  if (!button || !row) return;
  const name = row.dataset.agent;
  const site = state.agents.get(name)?.site ?? "";
  if (!window.confirm(`Forget agent ${name} of ${site}? Its receivers, their tiles and open alerts go; ` +
    "their history stays. If it reports again it comes back as new.")) return;
  button.disabled = true;
  try {
    const gone = await api("/agents/forget", { method: "POST", body: { agent: name } });
    state.agents.delete(name);
    renderAgents();
    const retired = gone.site_removed ? `; site ${gone.site} retired` : "";
    toast(`Forgot ${name}: ${gone.devices} receiver(s), ${gone.alerts_resolved} alert(s) resolved${retired}`, "ok");
    refreshAlertCount();
  } catch (error) {
    button.disabled = false;
    if (error instanceof ApiError && error.status === 403) toast("Not allowed: this needs the admin role.", "error");
    else if (error instanceof ApiError && error.status === 409) {
      toast(`${name} is reporting again: not forgotten.`, "error");
      loadAgents();
    } else toast(explain(error), "error");
  }
}

// ---------------------------------------------------------------------------------------
// TV mode, help, keyboard, search

function setTv(on, { fullscreen = false } = {}) {
  document.body.classList.toggle("tv", on);
  localStorage.setItem(TV_KEY, on ? "1" : "0");
  $("#btn-tv").setAttribute("aria-pressed", String(on));
  if (fullscreen && on && document.fullscreenEnabled && !document.fullscreenElement) {
    document.documentElement.requestFullscreen().catch(() => {});
  }
  if (!on && document.fullscreenElement) document.exitFullscreen().catch(() => {});
}

function toggleTv(fullscreen) {
  setTv(!document.body.classList.contains("tv"), { fullscreen });
}

function tickClock() {
  $("#tv-clock").textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderLegends() {
  const items = () => LEGEND.map(([key, label]) =>
    el("li", { "data-state": key, title: STATE_LABELS[key] ?? label }, el("span", { class: "swatch" }), label));
  $("#legend").replaceChildren(...items());
  $("#help-legend").replaceChildren(...items());
}

function closeOverlays() {
  let closed = false;
  for (const dialog of $$("dialog[open]")) {
    dialog.close();
    closed = true;
  }
  for (const view of state.tiles.values()) {
    if (!view.parts.renameForm.hidden) {
      closeRename(view);
      closed = true;
    }
  }
  return closed;
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const typing = event.target.closest?.("input, textarea, select, [contenteditable='true']");
  if (event.key === "Escape") {
    if (closeOverlays()) return;
    if (typing === $("#search") || state.filter) {
      $("#search").value = "";
      setFilter("");
      $("#search").blur();
      return;
    }
    if (state.arranging) {
      state.arranging = false;
      layoutTiles();
      return;
    }
    if (document.body.classList.contains("tv")) setTv(false);
    return;
  }
  if (typing || document.body.dataset.auth !== "in" || $("dialog[open]")) return;
  switch (event.key) {
    case "?":
      $("#help-dialog").showModal();
      break;
    case "f":
      go("#/fleet");
      break;
    case "a":
      go("#/alerts");
      break;
    case "g":
      go("#/agents");
      break;
    case "t":
      toggleTv(false);
      break;
    case "/":
      if (document.body.classList.contains("tv")) setTv(false);
      $("#search").focus();
      break;
    default:
      return;
  }
  event.preventDefault();
}

function setFilter(text) {
  state.filter = text.trim().toLowerCase();
  if (state.route.view === "site") applyTileFilter();
  else if (state.route.view === "fleet") renderFleet();
  else if (state.route.view === "alerts") renderAlerts();
  else if (state.route.view === "agents") renderAgents();
}

// ---------------------------------------------------------------------------------------
// Start

function wire() {
  $("#login-form").addEventListener("submit", onLogin);
  $("#btn-logout").addEventListener("click", () => {
    setToken(null);
    showLogin();
  });
  $("#btn-tv").addEventListener("click", () => toggleTv(true));
  $("#btn-tv-exit").addEventListener("click", () => setTv(false));
  $("#btn-help").addEventListener("click", () => $("#help-dialog").showModal());
  $("#search").addEventListener("input", (event) => setFilter(event.target.value));
  for (const container of [$("#tiles"), $("#tiles-others")]) {
    container.addEventListener("click", onTileClick);
    container.addEventListener("submit", onTileSubmit);
  }
  $("#alert-rows").addEventListener("click", onAlertAction);
  $("#agent-rows").addEventListener("click", onAgentAction);
  $("#alert-state").addEventListener("change", () => loadAlerts().catch((e) => toast(explain(e), "error")));
  $("#btn-new-group").addEventListener("click", () => openGroupDialog("new"));
  $("#btn-thresholds").addEventListener("click", () => openThresholds());
  $("#thresholds-form").addEventListener("submit", (event) => saveThresholds(event));
  $("#thresholds-defaults").addEventListener("click", (event) => saveThresholds(event, { allDefaults: true }));
  $("#thresholds-cancel").addEventListener("click", () => $("#thresholds-dialog").close());
  $("#thresholds-dialog").addEventListener("close", () => { thresholdsShown = null; });
  $("#btn-group-rename").addEventListener("click", () => openGroupDialog("rename"));
  $("#group-form").addEventListener("submit", onGroupSubmit);
  $("#group-cancel").addEventListener("click", () => $("#group-dialog").close());
  $("#btn-arrange").addEventListener("click", () => {
    state.arranging = !state.arranging;
    layoutTiles();
  });
  $("#btn-arrange-done").addEventListener("click", () => {
    state.arranging = false;
    layoutTiles();
  });
  $("#btn-group-left").addEventListener("click", () => moveGroup(-1));
  $("#btn-group-right").addEventListener("click", () => moveGroup(1));
  $("#btn-group-delete").addEventListener("click", deleteGroup);
  $("#history-range").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-hours]");
    if (button && historyView) openHistory(historyView, Number(button.dataset.hours));
  });
  $("#history-dialog").addEventListener("close", () => { historyView = null; });
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", route);
  // Ages on fleet cards and alert rows drift; refresh them now and then without refetching.
  setInterval(() => {
    if (state.route.view === "fleet") renderFleet();
    else if (state.route.view === "alerts") renderAlerts();
  }, 15_000);
  setInterval(tickClock, 10_000);
}

renderLegends();
wire();
tickClock();
setTv(localStorage.getItem(TV_KEY) === "1");
route();
