// How a monitoring user reads receiver values: the conventions of the micboard tradition.
// Pure functions only, so they are easy to reason about and cheap to call per message.

/** Battery states the API reports, and the tile states derived from them. */
export const BATTERY_STATES = [
  "good", "replace", "critical", "unknown",
  "previously_good", "previously_replace", "previously_critical",
];

/** Labels for every tile state, also used by the legend. */
export const STATE_LABELS = {
  good: "Good",
  replace: "Replace",
  critical: "Critical",
  previously_good: "Previously good",
  previously_replace: "Previously replace",
  previously_critical: "Previously critical",
  unknown: "No transmitter",
  offline: "Receiver offline",
  stale: "Stale",
};

/** Short words shown in a tile's status chip (empty for the ordinary case). */
const STATE_CHIPS = {
  good: "",
  replace: "REPLACE",
  critical: "CRITICAL",
  previously_good: "PREV. GOOD",
  previously_replace: "PREV. REPLACE",
  previously_critical: "PREV. CRITICAL",
  unknown: "TX OFF",
  offline: "OFFLINE",
  stale: "STALE",
};

/** Bars -> battery state when the API did not say (4-5 good, 3 replace, 0-2 critical). */
export function stateFromBars(bars) {
  if (bars === null || bars === undefined) return "unknown";
  if (bars >= 4) return "good";
  if (bars === 3) return "replace";
  return "critical";
}

/** The state a tile shows: receiver status first, then the transmitter battery. */
export function tileState(channel) {
  if (channel.status === "offline") return "offline";
  if (channel.status === "stale") return "stale";
  const state = channel.battery_state;
  if (BATTERY_STATES.includes(state)) return state;
  return channel.tx ? stateFromBars(channel.tx.battery_bars) : "unknown";
}

/** The chip text of a tile state. */
export function stateChip(state) {
  return STATE_CHIPS[state] ?? "";
}

/** `HH01 Fatai` -> ["HH01", "Fatai"]; underscores read as spaces; no id -> [null, whole]. */
export function splitName(name) {
  if (!name) return [null, null];
  const text = name.replaceAll("_", " ").trim();
  if (!text) return [null, null];
  const match = /^(\S+)(?:\s+(.*\S))?$/.exec(text);
  if (match && /^[A-Za-z]{1,4}\d{1,3}$/.test(match[1])) return [match[1], match[2] ?? null];
  return [null, text];
}

/** Channel id and person, preferring what the API already split. */
export function channelLabel(channel) {
  if (channel.name_id !== undefined || channel.name_person !== undefined) {
    const [id, person] = [channel.name_id ?? null, channel.name_person ?? null];
    if (id || person) return [id, person ? person.replaceAll("_", " ") : null];
  }
  return splitName(channel.name);
}

/** Minutes -> `h:mm`; unknown -> an em dash. */
export function formatRuntime(minutes) {
  if (minutes === null || minutes === undefined || !Number.isFinite(minutes) || minutes < 0) return "—";
  const m = Math.round(minutes);
  return `${Math.floor(m / 60)}:${String(m % 60).padStart(2, "0")}`;
}

/** kHz -> MHz with three decimals (`578350` -> `578.350`). */
export function formatMhz(khz) {
  if (khz === null || khz === undefined || !Number.isFinite(khz) || khz <= 0) return "—";
  return (khz / 1000).toFixed(3);
}

/** Percent with its sign, or an em dash. */
export function formatPercent(value) {
  return value === null || value === undefined ? "—" : `${value}%`;
}

/** A short "how long ago" for epoch milliseconds. */
export function formatAgo(ms, now = Date.now()) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** Local clock time of epoch milliseconds (`14:05:09`). */
export function formatClock(ms) {
  if (!ms) return "—";
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// Scales of the meters: RF from the noise floor to a strong signal, audio from -60 dBFS to 0.
export const RF_FLOOR_DBM = -100;
export const RF_TOP_DBM = -30;
export const AUDIO_FLOOR_DBFS = -60;

/** A level as a 0..1 fraction of its meter. */
export function fraction(value, floor, top) {
  if (value === null || value === undefined || !Number.isFinite(value)) return 0;
  return Math.min(1, Math.max(0, (value - floor) / (top - floor)));
}

/**
 * An antenna's look: the active one bright, others dim; red when the antenna carrying the
 * transmitter (or, with none marked active, any antenna) sits at the noise floor. An idle
 * diversity antenna reading low is normal, so it stays dim rather than alarming.
 *
 * `reported` is the receiver's own word for this antenna (a live meter's `antenna_states`, from
 * ULX-D, QLX-D and Axient Digital): it says which antennas are active (an Axient lights every
 * antenna receiving well, not only the strongest), and an Axient's red is its own verdict.
 */
export function antennaState(dbm, isActive, txOn, anyActive = true, reported = null) {
  if (reported === "red") return "red";
  if (reported === "active" || reported === "inactive") {
    isActive = reported === "active";
    anyActive = true;
  }
  const lost = txOn && dbm !== null && dbm !== undefined && dbm < -90;
  if (lost && (isActive || !anyActive)) return "red";
  return isActive ? "active" : "inactive";
}

/** Antenna letters in the order of `rf_dbm`. */
export const ANTENNAS = ["A", "B", "C", "D"];

/** How long an audio peak is held, in milliseconds. */
export const PEAK_HOLD_MS = 10_000;
