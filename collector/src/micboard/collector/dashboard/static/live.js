// The live WebSocket: authenticate, subscribe to one scope, reconnect with backoff.
// Each (re)connection starts with a fresh snapshot, so no state survives a reconnect.

const BACKOFF_INITIAL_MS = 500;
const BACKOFF_MAX_MS = 10_000;
// The server sends at least a keepalive every 10 s. A link that brought nothing for this long
// is dead even if the socket looks open (a cable pulled, a sleeping laptop, a proxy gone quiet):
// reconnect rather than keep showing what may no longer be true.
export const SILENT_LINK_MS = 25_000;

/** One subscription to `/api/v1/live`; call `start(scope)` to (re)subscribe, `stop()` to end. */
export class LiveConnection {
  /**
   * @param {() => string|null} tokenSource where the current token comes from
   * @param {(message: object) => void} onMessage every parsed server message (a batch's items one by one)
   * @param {(state: string) => void} onState "connecting" | "live" | "reconnecting" | "closed"
   */
  constructor(tokenSource, onMessage, onState) {
    this.tokenSource = tokenSource;
    this.onMessage = onMessage;
    this.onState = onState;
    this.scope = null;
    this.socket = null;
    this.retryMs = BACKOFF_INITIAL_MS;
    this.retryTimer = null;
    this.lastMessageAt = 0; // when this connection last heard anything (or began)
    this.watchdog = setInterval(() => this.#checkSilence(), 5000);
  }

  /** Subscribe to `scope` ({scope:"fleet"} | {scope:"site",site} | {scope:"group",group_id}). */
  start(scope) {
    const same = this.scope && JSON.stringify(this.scope) === JSON.stringify(scope);
    this.scope = scope;
    if (same && this.socket && this.socket.readyState <= WebSocket.OPEN) return;
    this.retryMs = BACKOFF_INITIAL_MS;
    this.#open();
  }

  /** Close for good (sign out). */
  stop() {
    this.scope = null;
    clearTimeout(this.retryTimer);
    this.#close();
    this.onState("closed");
  }

  #checkSilence() {
    const socket = this.socket;
    // Connecting or open: a connection attempt that hangs (a server gone from the network)
    // counts as silence from the moment it began.
    if (!socket || socket.readyState > WebSocket.OPEN) return;
    if (Date.now() - this.lastMessageAt < SILENT_LINK_MS) return;
    // Closing a dead socket may never complete: drop it and connect afresh.
    this.#close();
    this.#retryLater();
  }

  #retryLater() {
    this.onState("reconnecting");
    // Full jitter keeps a wall of screens from reconnecting in lock step after a restart.
    const delay = Math.random() * this.retryMs + 100;
    this.retryMs = Math.min(this.retryMs * 2, BACKOFF_MAX_MS);
    this.retryTimer = setTimeout(() => this.#open(), delay);
  }

  #close() {
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onclose = socket.onmessage = socket.onerror = socket.onopen = null;
      socket.close();
    }
  }

  #open() {
    clearTimeout(this.retryTimer);
    this.#close();
    const token = this.tokenSource();
    if (!token || !this.scope) return;
    this.onState("connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/api/v1/live`);
    this.socket = socket;
    this.lastMessageAt = Date.now();
    socket.onopen = () => {
      this.lastMessageAt = Date.now();
      socket.send(JSON.stringify({ type: "auth", token }));
      socket.send(JSON.stringify({ type: "subscribe", ...this.scope }));
    };
    socket.onmessage = (event) => {
      this.lastMessageAt = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to interpret
      }
      // Several messages queued together come as one frame: {type: "batch", items: [message, ...]},
      // each item a message as it would have come alone, in order.
      const messages = message?.type === "batch" && Array.isArray(message.items) ? message.items : [message];
      for (const item of messages) {
        if (item?.type === "snapshot") {
          this.retryMs = BACKOFF_INITIAL_MS;
          this.onState("live");
        }
        this.onMessage(item);
        // A handler may have ended or replaced this connection (sign out, unauthorized).
        if (this.socket !== socket) return;
      }
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      // 4401 / 1008: the server refused the token; the REST side will send the user to login.
      if (event.code === 4401 || event.code === 4001) {
        this.onMessage({ type: "unauthorized" });
        this.onState("closed");
        return;
      }
      this.#retryLater();
    };
  }
}
