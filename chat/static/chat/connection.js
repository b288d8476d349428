// One chat room over the Clarity Chat wire protocol: the socket, reconnection with capped
// exponential backoff and jitter, client heartbeats, catching up on missed room events by
// their sequence numbers (protocol §15), and re-sending messages whose echo never came.
//
// Catching up: the connection knows the highest seq up to which it has seen every room event
// (`contiguous`: from the ack's last_seq at the first join, then messages and history
// entries). It fetches `history` `after_seq: contiguous`, page after page until the server has
// no more, after a reconnect, on `resync`, and when a gap (a message beyond contiguous + 1)
// is still open GAP_WAIT_MS after it opened: frames from different workers may arrive out of
// order, and the missing one usually comes on its own. One catch-up at a time.
//
// Events: "frame" (detail: every server frame, parsed) and "state" (detail: {state, code,
// reason, delay}); state is "connecting", "open", "waiting" (a reconnect is scheduled in
// `delay` ms) or "closed" (for good: closed by us, or a close code that must not be retried).

export const BACKOFF_BASE_MS = 500;
export const BACKOFF_CAP_MS = 30000;
const MAX_AUTH_RETRIES = 2;
// A gap in the room's seqs is fetched only if it is still open after this long (protocol §15).
export const GAP_WAIT_MS = 1000;
// The `scope` of the rate-limit refusals a catch-up read can get.
const CATCH_UP_REFUSALS = new Set([undefined, "catch_up", "bytes"]);

// Exponential backoff with "equal jitter": half the step is fixed, half random, so clients
// that dropped together do not come back together, and no retry is ever immediate.
export function backoffDelay(attempt, random = Math.random) {
  const step = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return step / 2 + (random() * step) / 2;
}

// A room event's seq, or null (a frame of no room event: an analysis narrative).
function seqOf(value) {
  return Number.isSafeInteger(value) && value > 0 ? value : null;
}

// The seq of a message's latest event: its last edit or deletion, else its creation.
export function latestSeq(message) {
  return seqOf(message.changed_seq) ?? seqOf(message.seq);
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
    this.userId = null;
    this.contiguous = 0; // every room event up to this seq has been seen
    this.seen = new Set(); // seqs seen beyond contiguous + 1 (gaps before them)
    this.target = 0; // the room's last seq, as the server last said (ack, resync)
    this.gapTimer = null;
    this.catchUpTimer = null;
    this.catchUpRequest = null; // {id, after, target} of the page awaited
    this.requestSeq = 0;
    this.unacknowledged = new Map(); // client message id → the `message` frame sent
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

  // Sends a chat message with its client `message_id`; until its echo arrives it is sent
  // again, with the same id, after each reconnect (the server stores it once, protocol §15).
  sendMessage(frame) {
    if (!this.send(frame)) return false;
    this.unacknowledged.set(frame.message_id, frame);
    return true;
  }

  // A message the server refused (e.g. rate-limited): not to be sent again.
  forgetMessage(clientId) {
    this.unacknowledged.delete(clientId);
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
    this.stopCatchingUp();
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
    if (frame.type === "connection_ack") this.joined(frame);
    else if (frame.type === "message") this.messageSeen(frame);
    else if (frame.type === "message_updated" || frame.type === "message_deleted") {
      this.noteSeq(seqOf(frame.seq)); // a change is a room event of its own (§12, §15)
    }
    else if (frame.type === "history") this.pageSeen(frame);
    else if (frame.type === "resync") this.resync(frame.last_seq);
    else if (frame.type === "error") this.refused(frame);
    this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
  }

  joined(ack) {
    this.attempt = 0;
    this.authRetries = 0;
    this.userId = ack.user_id;
    this.startHeartbeat(ack.server_info?.heartbeat_interval);
    const lastSeq = seqOf(ack.server_info?.last_seq) ?? 0;
    // The first join starts from the room's present (its join history shows the newest
    // messages, older ones are paged back to); a reconnect fetches all it missed.
    if (this.sessions === 0) this.advanceTo(lastSeq);
    this.sessions += 1;
    this.emitState("open");
    this.resync(lastSeq);
    this.resendUnacknowledged();
  }

  messageSeen(message) {
    if (message.user_id === this.userId) this.unacknowledged.delete(message.client_message_id);
    this.noteSeq(seqOf(message.seq));
  }

  pageSeen(page) {
    for (const message of page.messages) {
      this.messageSeen(message);
      this.noteSeq(seqOf(message.changed_seq));
    }
    if (page.request_id !== null && page.request_id === this.catchUpRequest?.id) {
      this.caughtUpTo(page);
    }
  }

  // The room's last seq is `lastSeq` (the ack; `resync` after the server's channel layer
  // lost events): fetch what is missing up to it.
  resync(lastSeq) {
    this.target = Math.max(this.target, seqOf(lastSeq) ?? 0);
    if (this.contiguous < this.target) this.catchUp();
  }

  // A catch-up read refused by a budget (its own allowance, bytes, or frames when catch-up
  // reads count as frames): asked again once the server says it would fit. (An error frame
  // names no request: a refusal of another frame meanwhile costs one page asked twice.)
  refused(error) {
    const retryAfter = Number(error.details?.retry_after);
    if (error.error_code !== "RATE_LIMIT_EXCEEDED" || !(retryAfter > 0)) return;
    if (this.catchUpRequest === null || !CATCH_UP_REFUSALS.has(error.details.scope)) return;
    this.catchUpRequest = null;
    this.catchUpTimer = setTimeout(() => {
      this.catchUpTimer = null;
      this.catchUp();
    }, retryAfter * 1000);
  }

  // One room event seen: contiguous moves on over every seq seen in a row; a seq beyond the
  // next one opens a gap.
  noteSeq(seq) {
    if (seq === null || seq <= this.contiguous) return;
    this.seen.add(seq);
    this.advanceTo(this.contiguous);
    this.watchGap();
  }

  advanceTo(seq) {
    this.contiguous = Math.max(this.contiguous, seq);
    for (const known of this.seen) if (known <= this.contiguous) this.seen.delete(known);
    while (this.seen.delete(this.contiguous + 1)) this.contiguous += 1;
  }

  // A gap still open GAP_WAIT_MS after it opened is fetched (each gap gets its own wait).
  watchGap() {
    if (this.seen.size === 0) {
      clearTimeout(this.gapTimer);
      this.gapTimer = null;
      return;
    }
    if (this.gapTimer !== null) return;
    const hole = this.contiguous + 1;
    this.gapTimer = setTimeout(() => {
      this.gapTimer = null;
      if (this.contiguous < hole) this.catchUp();
      else this.watchGap();
    }, GAP_WAIT_MS);
  }

  // Asks for the room events after `contiguous` (a no-op while a page is awaited: its end
  // looks again).
  catchUp() {
    if (this.catchUpRequest !== null || this.catchUpTimer !== null || !this.isOpen) return;
    this.requestSeq += 1;
    // Whatever the server stored before it reads this page is in it: the room's last seq
    // known now, and every seq seen so far, are caught up with once the pages end.
    const target = Math.max(this.target, ...this.seen);
    const request = { id: `catch-up-${this.requestSeq}`, after: this.contiguous, target };
    this.catchUpRequest = request;
    this.send({
      type: "history",
      after_seq: request.after,
      limit: this.catchUpPage,
      request_id: request.id,
    });
  }

  // A catch-up page arrived: its entries are every message created or changed after the
  // request's seq, in the order of their latest seq, so every event up to the last entry's
  // has been seen. Then the next page, or done.
  caughtUpTo(page) {
    const request = this.catchUpRequest;
    this.catchUpRequest = null;
    const last = page.messages.at(-1);
    if (last) this.advanceTo(latestSeq(last) ?? request.after);
    if (page.has_more && last) {
      this.catchUp();
      return;
    }
    // The last page: seqs up to the target that no entry showed belong to messages gone
    // since (nothing left to fetch for them).
    this.advanceTo(request.target);
    if (this.contiguous < this.target) this.catchUp();
    else this.watchGap();
  }

  stopCatchingUp() {
    clearTimeout(this.gapTimer);
    clearTimeout(this.catchUpTimer);
    this.gapTimer = null;
    this.catchUpTimer = null;
    this.catchUpRequest = null;
  }

  // After a reconnect: messages whose echo never came, in the order they were sent.
  resendUnacknowledged() {
    for (const frame of this.unacknowledged.values()) this.send(frame);
  }

  closed(event) {
    this.socket = null;
    this.stopHeartbeat();
    this.stopCatchingUp();
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
