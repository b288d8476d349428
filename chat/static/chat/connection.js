// One chat room over the Clarity Chat wire protocol: the socket, reconnection with capped
// exponential backoff and jitter, client heartbeats, and catching up on missed messages.
//
// Events: "frame" (detail: every server frame, parsed) and "state" (detail: {state, code,
// reason, delay}); state is "connecting", "open", "waiting" (a reconnect is scheduled in
// `delay` ms) or "closed" (for good: closed by us, or a close code that must not be retried).

export const BACKOFF_BASE_MS = 500;
export const BACKOFF_CAP_MS = 30000;
const MAX_AUTH_RETRIES = 2;

// Exponential backoff with "equal jitter": half the step is fixed, half random, so clients
// that dropped together do not come back together, and no retry is ever immediate.
export function backoffDelay(attempt, random = Math.random) {
  const step = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return step / 2 + (random() * step) / 2;
}

function numericId(messageId) {
  const value = Number(messageId);
  return Number.isSafeInteger(value) ? value : 0;
}

export class RoomConnection extends EventTarget {
  // room: a valid room id; tokens: {getToken(force) → Promise<string>};
  // socketUrl(room, token) → the WebSocket URL; closeCodes: the server's close codes grouped
  // by what to do after them (the page's config: `final` are not retried, `auth` get a new
  // token first, `rateLimited` wait the longest; any other is retried with backoff, then
  // missed messages are fetched); catchUpPage: the largest `history` page the server gives.
  constructor({ room, tokens, socketUrl, closeCodes, catchUpPage }) {
    super();
    this.room = room;
    this.tokens = tokens;
    this.socketUrl = socketUrl;
    this.finalCloses = new Set(closeCodes.final);
    this.authCloses = new Set(closeCodes.auth);
    this.rateLimitedCloses = new Set(closeCodes.rateLimited);
    this.catchUpPage = catchUpPage;
    this.socket = null;
    this.stopped = false;
    this.attempt = 0;
    this.authRetries = 0;
    this.forceNewToken = false;
    this.retryTimer = null;
    this.heartbeatTimer = null;
    this.sessions = 0;
    this.lastMessageId = 0;
    this.catchUpRequest = null;
    this.requestSeq = 0;
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  async open() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.stopped) return;
    this.emitState("connecting");
    let token;
    try {
      token = await this.tokens.getToken(this.forceNewToken);
    } catch (error) {
      this.retry({ code: 0, reason: `Could not get a sign-in token: ${error.message}` });
      return;
    }
    if (this.stopped) return;
    this.forceNewToken = false;
    const socket = new WebSocket(this.socketUrl(this.room, token));
    this.socket = socket;
    socket.addEventListener("message", (event) => {
      if (socket === this.socket) this.receive(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket === this.socket) this.closed(event);
    });
  }

  // Sends one frame; false if the socket is not open (the frame is not queued).
  send(frame) {
    if (!this.isOpen) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  // A refreshed token for the open session (protocol §2, answered by auth_ack); a later
  // reconnect asks the token source again anyway.
  updateToken(token) {
    this.send({ type: "auth", token });
  }

  // Retry now instead of waiting out the backoff (e.g. the browser is back online).
  retryNow() {
    if (!this.stopped && this.retryTimer !== null) this.open();
  }

  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.stopHeartbeat();
    const socket = this.socket;
    this.socket = null;
    if (socket !== null) socket.close(1000);
    this.emitState("closed");
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.type === "connection_ack") {
      this.attempt = 0;
      this.authRetries = 0;
      this.startHeartbeat(frame.server_info?.heartbeat_interval);
      const resumed = this.sessions > 0 && this.lastMessageId > 0;
      this.sessions += 1;
      this.emitState("open");
      // Before the join history arrives: `after` is the newest message seen before the drop.
      if (resumed) this.catchUp(this.lastMessageId);
    } else if (frame.type === "message") {
      this.noteMessageId(frame.message_id);
    } else if (frame.type === "history") {
      const pageNewest = Math.max(0, ...frame.messages.map((m) => numericId(m.message_id)));
      frame.messages.forEach((m) => this.noteMessageId(m.message_id));
      if (frame.request_id !== null && frame.request_id === this.catchUpRequest) {
        this.catchUpRequest = null;
        if (frame.has_more && pageNewest > 0) this.catchUp(pageNewest);
      }
    }
    this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
  }

  catchUp(after) {
    this.requestSeq += 1;
    this.catchUpRequest = `catch-up-${this.requestSeq}`;
    this.send({
      type: "history",
      after,
      limit: this.catchUpPage,
      request_id: this.catchUpRequest,
    });
  }

  noteMessageId(messageId) {
    this.lastMessageId = Math.max(this.lastMessageId, numericId(messageId));
  }

  closed(event) {
    this.socket = null;
    this.stopHeartbeat();
    if (this.stopped) return;
    const { code, reason } = event;
    if (this.finalCloses.has(code)) {
      this.stopped = true;
      this.emitState("closed", { code, reason });
      return;
    }
    if (this.authCloses.has(code)) {
      if (this.authRetries >= MAX_AUTH_RETRIES) {
        this.stopped = true;
        this.emitState("closed", { code, reason });
        return;
      }
      this.authRetries += 1;
      this.forceNewToken = true;
    }
    this.retry({ code, reason });
  }

  retry({ code, reason }) {
    const delay = this.rateLimitedCloses.has(code) ? BACKOFF_CAP_MS : backoffDelay(this.attempt);
    this.attempt += 1;
    this.emitState("waiting", { code, reason, delay });
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  startHeartbeat(intervalSeconds) {
    this.stopHeartbeat();
    // The server closes after connection_timeout (300 s) of silence: an idle reader keeps
    // the session alive with heartbeats, which the rate limit does not count.
    const every = Math.max(5, Number(intervalSeconds) || 30) * 1000;
    this.heartbeatTimer = setInterval(() => {
      this.send({ type: "heartbeat", client_timestamp: new Date().toISOString() });
    }, every);
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  emitState(state, details = {}) {
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...details } }));
  }
}
