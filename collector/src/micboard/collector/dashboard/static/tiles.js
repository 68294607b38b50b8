// Channel tiles: created once per channel, then updated in place. Writes go to the DOM only
// when a shown value changed, and live meters are applied in one animation frame per batch.

import {
  ANTENNAS, AUDIO_FLOOR_DBFS, PEAK_HOLD_MS, RF_FLOOR_DBM, RF_TOP_DBM,
  antennaState, channelLabel, formatMhz, formatPercent, formatRuntime, fraction, stateChip, tileState,
} from "./readings.js";

/** The key of a channel everywhere in the page: `<device_id>:<index>`. */
export function channelKey(deviceId, index) {
  return `${deviceId}:${index}`;
}

/** One tile: its element, references to the parts that change, and what they show now. */
export class TileView {
  constructor(template, channel) {
    const root = template.content.firstElementChild.cloneNode(true);
    this.root = root;
    this.key = channelKey(channel.device_id, channel.index);
    root.dataset.deviceId = String(channel.device_id);
    root.dataset.index = String(channel.index);
    root.dataset.key = this.key;
    const part = (name) => root.querySelector(`[data-part="${name}"]`);
    this.parts = {
      id: part("id"), person: part("person"), chip: part("chip"), battery: part("battery"),
      percent: part("percent"), runtime: part("runtime"), model: part("model"), freq: part("freq"),
      device: part("device"), rf: part("rf"), audioFill: part("audio-fill"), audioPeak: part("audio-peak"),
      message: part("message"), renameForm: part("rename-form"),
    };
    this.segments = [...this.parts.battery.children];
    this.antennas = [];
    this.shown = {}; // last written value per part, to skip DOM writes that change nothing
    this.peak = { dbfs: -Infinity, at: 0 };
    this.channel = null;
  }

  #text(part, value) {
    if (this.shown[part] !== value) {
      this.shown[part] = value;
      this.parts[part].textContent = value;
    }
  }

  #attr(node, name, value, cacheKey) {
    if (this.shown[cacheKey] !== value) {
      this.shown[cacheKey] = value;
      node.setAttribute(name, value);
    }
  }

  /** Show `channel` (an item of /channels or a live `channel` message). */
  update(channel) {
    this.channel = channel;
    const state = tileState(channel);
    const tx = channel.tx ?? null;
    const [id, person] = channelLabel(channel);
    this.#attr(this.root, "data-state", state, "state");
    this.#attr(this.root, "data-status", channel.status ?? "online", "status");
    this.#attr(this.root, "data-tx", tx ? "on" : "off", "tx");
    this.#attr(this.root, "data-muted", tx?.muted ? "true" : "false", "muted");
    this.#attr(this.root, "title", `${channel.device_name ?? channel.model ?? ""} ch ${channel.index}`, "title");
    this.#text("id", id ?? `CH${channel.index}`);
    this.#text("person", person ?? (id ? "" : channel.name ?? ""));
    this.#text("chip", tx?.muted && state === "good" ? "MUTED" : stateChip(state));
    // Unknown and previously-known batteries show no bars: the label carries the last state.
    // Nor does a receiver that is offline or stale: its reading is the last it gave, not now's
    // (the API says previously_*; the percent and runtime stay, dimmed, as that last reading).
    const live = (channel.status ?? "online") === "online";
    const known = live && !state.startsWith("previously") && state !== "unknown";
    const bars = tx && known ? tx.battery_bars ?? 0 : 0;
    this.#attr(this.parts.battery, "data-bars", String(bars), "bars");
    this.segments.forEach((segment, i) => {
      this.#attr(segment, "data-on", i < bars ? "1" : "0", `seg${i}`);
    });
    this.#text("percent", tx ? formatPercent(tx.battery_percent) : "—");
    this.#text("runtime", tx ? formatRuntime(tx.runtime_min) : "—");
    this.#text("model", tx?.model ?? (tx ? "TX" : "no transmitter"));
    this.#text("freq", formatMhz(channel.frequency_khz));
    this.#text("device", `${channel.device_name || channel.model || channel.device_key || ""} · ${channel.index}`);
    if (!tx || channel.status !== "online") this.#quietMeters();
  }

  #ensureAntennas(count) {
    if (this.antennas.length === count) return;
    this.parts.rf.replaceChildren();
    this.antennas = [];
    for (let i = 0; i < count; i += 1) {
      const row = document.createElement("div");
      row.className = "ant";
      row.dataset.antenna = ANTENNAS[i] ?? String(i + 1);
      const label = document.createElement("b");
      label.textContent = row.dataset.antenna;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      track.append(fill);
      row.append(label, track);
      this.parts.rf.append(row);
      this.antennas.push({ row, fill, state: "", scale: -1 });
    }
  }

  #quietMeters() {
    for (const antenna of this.antennas) {
      antenna.fill.style.transform = "scaleX(0)";
      antenna.scale = 0;
    }
    this.parts.audioFill.style.transform = "scaleX(1)";
    // No level is live any more: a held peak would show a reading that is not there.
    if (this.peak.at) {
      this.peak = { dbfs: -Infinity, at: 0 };
      this.#showPeak();
    }
  }

  /** Apply one live meter message; called from the animation frame only. */
  meter(message, now) {
    const levels = Array.isArray(message.rf_dbm) ? message.rf_dbm : [];
    const reported = Array.isArray(message.antenna_states) ? message.antenna_states : [];
    this.#ensureAntennas(Math.max(levels.length, reported.length, 2));
    const txOn = Boolean(this.channel?.tx) && this.channel?.status === "online";
    this.antennas.forEach((antenna, i) => {
      const dbm = levels[i] ?? null;
      const active = message.active_antenna === antenna.row.dataset.antenna;
      const state = antennaState(dbm, active, txOn, Boolean(message.active_antenna), reported[i] ?? null);
      if (antenna.state !== state) {
        antenna.state = state;
        antenna.row.dataset.antennaState = state;
      }
      const scale = fraction(dbm, RF_FLOOR_DBM, RF_TOP_DBM);
      if (Math.abs(antenna.scale - scale) > 0.004) {
        antenna.scale = scale;
        antenna.fill.style.transform = `scaleX(${scale.toFixed(3)})`;
      }
    });
    // Without a transmitter the receiver's audio is its own floor, not a level to show (as
    // #quietMeters() leaves the tile when the transmitter goes).
    const heard = Boolean(this.channel?.tx);
    const level = heard ? (message.audio_dbfs ?? null) : null;
    const audio = fraction(level, AUDIO_FLOOR_DBFS, 0);
    // The cover hides the part of the coloured scale above the level.
    this.parts.audioFill.style.transform = `scaleX(${(1 - audio).toFixed(3)})`;
    const peak = heard ? (message.audio_peak_dbfs ?? level) : null;
    if (peak !== null && (peak >= this.peak.dbfs || now - this.peak.at > PEAK_HOLD_MS)) {
      const changed = peak !== this.peak.dbfs;
      this.peak = { dbfs: peak, at: now };
      if (changed) this.#showPeak();
    }
  }

  /** Let a peak older than the hold time fall back to the current level. */
  expirePeak(now) {
    if (this.peak.at && now - this.peak.at > PEAK_HOLD_MS) {
      this.peak = { dbfs: -Infinity, at: 0 };
      this.#showPeak();
    }
  }

  #showPeak() {
    const peak = this.peak.dbfs;
    const position = Number.isFinite(peak) ? fraction(peak, AUDIO_FLOOR_DBFS, 0) : 0;
    // The marker is as wide as its track, so translateX(%) is a position along the track.
    this.parts.audioPeak.style.transform = `translateX(${(position * 100).toFixed(1)}%)`;
    this.parts.audioPeak.dataset.visible = position > 0 ? "1" : "0";
    this.parts.audioPeak.dataset.dbfs = Number.isFinite(peak) ? peak.toFixed(1) : "";
  }

  /** A short note under the tile (command outcomes); cleared after `ms` unless 0. */
  say(text, kind = "info", ms = 6000) {
    clearTimeout(this.messageTimer);
    this.parts.message.textContent = text;
    this.parts.message.dataset.kind = kind;
    this.parts.message.hidden = !text;
    if (ms) this.messageTimer = setTimeout(() => this.say("", "info", 0), ms);
  }
}

/** Batches live meter messages into one DOM pass per animation frame (latest wins per tile). */
export class MeterScheduler {
  constructor(lookup) {
    this.lookup = lookup; // key -> TileView | undefined
    this.pending = new Map();
    this.frame = 0;
    this.visibleOnly = true;
    // Peaks must fall back after their hold time even when no meter arrives.
    this.peakTimer = setInterval(() => this.#expirePeaks(), 1000);
    this.holding = new Set();
  }

  /** Queue one channel's reading (an item of a `meters` message); the newest per channel wins. */
  push(message) {
    this.pending.set(channelKey(message.device_id, message.index), message);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.#flush());
  }

  #flush() {
    this.frame = 0;
    const now = performance.now();
    for (const [key, message] of this.pending) {
      const view = this.lookup(key);
      if (!view || view.root.hidden) continue;
      view.meter(message, now);
      this.holding.add(view);
    }
    this.pending.clear();
  }

  #expirePeaks() {
    const now = performance.now();
    for (const view of this.holding) {
      view.expirePeak(now);
      if (!view.peak.at) this.holding.delete(view);
    }
  }
}
