// Clarity Chat in the browser: sign in, pick one of your rooms or a public one, start a
// private room or a direct conversation, chat, see who is online and typing, ask the
// assistant and watch its answer being written, run a health analysis on sample data. Speaks
// the wire protocol v1.1 (rooms and membership, §11; streaming assistant replies, §14;
// sequence numbers and recovery, §15).
//
// User content, and what the assistant writes, is only ever put on the page as text
// (textContent), never parsed as HTML.

import { latestSeq, RoomConnection } from "./connection.js";
import { RoomsApi } from "./rooms.js";
import { DevSignIn } from "./signin.js";
import { AssistantStreams, idleTimeoutMs } from "./streams.js";

const config = JSON.parse(document.getElementById("clarity-config").textContent);
const $ = (id) => document.getElementById(id);

const ROOM_ID = new RegExp(config.roomIdPattern);
const AI_USER_ID = config.aiUserId;
const AI_MENTION = config.aiMention;
const ROOM_REFUSED_CLOSES = new Set(config.closeCodes.roomRefused);
const SLOW_CLOSES = new Set(config.closeCodes.slow);
const KIND_LABELS = {
  public: "Public room",
  private: "Private room",
  direct: "Direct message",
};
// The server withdraws an unrefreshed is_typing:true after `typingTimeout` seconds; this
// client expires it itself a little later, in case the withdrawal never arrives (e.g. the
// socket dropped).
const TYPING_TIMEOUT_MS = config.typingTimeout * 1000;
const OTHERS_TYPING_EXPIRY_MS = TYPING_TIMEOUT_MS + 1000;
// While the user keeps typing, is_typing:true is repeated this often (well inside the
// server's timeout), and withdrawn after this long without a keystroke.
const TYPING_REFRESH_MS = TYPING_TIMEOUT_MS / 2;
const TYPING_IDLE_MS = 4000;
const ALERT_MS = 8000;
const METRICS = [
  ["total_sleep_time", "Total sleep", (v) => `${v.toFixed(1)} h`],
  ["sleep_efficiency", "Sleep efficiency", (v) => `${Math.round(v * 100)}%`],
  ["sleep_onset_latency", "Time to fall asleep", (v) => `${Math.round(v)} min`],
  ["wake_after_sleep_onset", "Awake after sleep onset", (v) => `${Math.round(v)} min`],
  ["interdaily_stability", "Day-to-day regularity", (v) => v.toFixed(2)],
  ["relative_amplitude", "Day/night contrast", (v) => v.toFixed(2)],
];

const state = {
  signIn: null,
  api: null,
  me: null,
  connection: null,
  myRooms: [], // GET rooms: the user's rooms
  publicRooms: [], // GET rooms?kind=public
  roomsLoad: 0, // the latest list request; older answers are dropped
  roomsLoaded: false,
  roomsDrawn: "", // what the lists show, to redraw them only when it changes
  analysing: false,
  lastFrame: null, // the latest frame of this room's connection
  messages: new Map(), // stored message id → {li, seq, latest}: shown once each
  newestSeq: 0,
  readSent: 0, // the highest seq this room's `read` frames have reported (protocol §12)
  readTimer: null, // a `read` waiting for its second to pass
  readSentAt: 0,
  readBy: new Map(), // user id → the seq they have read this room up to (receipts)
  presence: new Map(), // user id → presence entry
  typing: new Map(), // user id → {username, timer}
  typingSentAt: 0,
  typingIdleTimer: null,
  lastSent: null, // {clientId, content} until the server echoes it
  sendBlockedUntil: 0,
  clientSeq: 0,
};

// The assistant's answers being written (protocol §14): a reply as a bubble in the message
// list, an analysis narrative in the health panel, each until its stored message arrives.
const streams = new AssistantStreams({ show: showStream, drop: dropStream });

// --- small DOM helpers --------------------------------------------------------------------

function el(tag, { className, text, data } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(data || {})) node.dataset[key] = value;
  node.append(...children);
  return node;
}

function clockTime(timestamp) {
  const moment = new Date(timestamp);
  if (Number.isNaN(moment.getTime())) return "";
  return moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function initial(name) {
  const [first] = (name || "").trim();
  return first ? first.toUpperCase() : "?";
}

function hue(text) {
  let hash = 0;
  for (const char of text) hash = (hash * 31 + char.codePointAt(0)) % 360;
  return hash;
}

function showAlert(text, kind = "error", { key, timeout = ALERT_MS } = {}) {
  const alerts = $("alerts");
  if (key) alerts.querySelector(`[data-key="${key}"]`)?.remove();
  const close = el("button", { className: "link", text: "Dismiss" });
  const alert = el("div", { className: `alert alert-${kind}`, data: { key: key || "" } });
  alert.setAttribute("role", kind === "error" ? "alert" : "status");
  alert.append(el("span", { text }), close);
  close.addEventListener("click", () => alert.remove());
  alerts.append(alert);
  if (timeout) setTimeout(() => alert.remove(), timeout);
  return alert;
}

// --- sign-in ------------------------------------------------------------------------------

async function createSignIn() {
  const options = config.signIn;
  if (options.method === "dev") {
    const csrf = document.querySelector("#dev-sign-in [name=csrfmiddlewaretoken]").value;
    return new DevSignIn({ tokenUrl: options.tokenUrl, csrfToken: csrf });
  }
  if (options.method === "firebase") {
    const { FirebaseSignIn } = await import("./firebase.js");
    return new FirebaseSignIn(options);
  }
  return null;
}

function roomInAddress() {
  return new URLSearchParams(location.hash.slice(1)).get("room");
}

// --- web push (protocol §13): only with real Firebase and web push configured ------------

const PUSH_TOKEN_KEY = "clarity.pushToken";

function offerPush() {
  const button = $("push-enable");
  const supported = "Notification" in window && "serviceWorker" in navigator;
  button.hidden = !(config.signIn.webPush && supported && state.signIn.pushToken);
  if (button.hidden) return;
  const on = Notification.permission === "granted" && localStorage.getItem(PUSH_TOKEN_KEY);
  button.textContent = on ? "Notifications on" : "Turn on notifications";
  button.disabled = Boolean(on);
  if (Notification.permission === "granted") registerPush(); // the token may have changed
}

async function registerPush() {
  try {
    if ((await Notification.requestPermission()) !== "granted") return;
    const token = await state.signIn.pushToken();
    if (!token) return;
    await state.api.registerDevice(token);
    localStorage.setItem(PUSH_TOKEN_KEY, token);
    $("push-enable").textContent = "Notifications on";
    $("push-enable").disabled = true;
  } catch (error) {
    showAlert(`Notifications could not be turned on: ${error.message}`, "warning");
  }
}

// Signing out: this browser's token is removed first, while the user's ID token is valid.
async function unregisterPush() {
  const token = localStorage.getItem(PUSH_TOKEN_KEY);
  if (!token) return;
  localStorage.removeItem(PUSH_TOKEN_KEY);
  await state.api.removeDevice(token).catch(() => {});
}

function signedIn(user) {
  state.me = user;
  offerPush();
  $("account-name").textContent = user.name;
  $("my-uid").textContent = user.uid;
  $("account").hidden = false;
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  refreshRooms();
  const room = roomInAddress();
  if (room) joinRoom(room);
  else showNoRoom();
}

async function signOut() {
  leaveRoom();
  await unregisterPush();
  await state.signIn.signOut();
  state.me = null;
  state.myRooms = [];
  state.publicRooms = [];
  state.roomsLoad += 1;
  state.roomsLoaded = false;
  renderRooms();
  $("account").hidden = true;
  $("chat").hidden = true;
  $("sign-in").hidden = false;
  setStatus("offline", "Not connected");
}

function wireSignIn() {
  const devForm = $("dev-sign-in");
  devForm?.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("dev-name").value.trim();
    if (!name) return;
    try {
      signedIn(await state.signIn.signIn(name));
    } catch (error) {
      showAlert(`Sign-in failed: ${error.message}`);
    }
  });
  $("google-sign-in")?.addEventListener("click", async () => {
    try {
      signedIn(await state.signIn.signIn());
    } catch (error) {
      showAlert(`Sign-in failed: ${error.message}`);
    }
  });
  $("sign-out").addEventListener("click", signOut);
  $("push-enable").addEventListener("click", registerPush);
}

// --- rooms and the connection -------------------------------------------------------------

function socketUrl(room, token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const path = config.socketPath + encodeURIComponent(room);
  return `${scheme}//${location.host}${path}?token=${encodeURIComponent(token)}`;
}

function leaveRoom() {
  const connection = state.connection;
  state.connection = null;
  connection?.close();
  stopTyping();
  for (const { timer } of state.typing.values()) clearTimeout(timer);
  state.typing.clear();
  state.presence.clear();
  streams.reset();
  state.messages.clear();
  state.newestSeq = 0;
  clearTimeout(state.readTimer);
  state.readTimer = null;
  state.readSent = 0;
  state.readSentAt = 0;
  state.readBy.clear();
  state.lastSent = null;
  state.lastFrame = null;
  $("messages").replaceChildren();
  renderPresence();
  renderTyping();
}

// The room's link (`#room=<id>`) is what the address bar shows while it is open: it can be
// shared as an invitation (it opens the room for anyone allowed in).
function joinRoom(room) {
  if (!ROOM_ID.test(room)) {
    showAlert("That link does not name a room.");
    if (state.connection === null) showNoRoom();
    return;
  }
  if (state.connection?.room === room && !state.connection.stopped) {
    state.connection.retryNow();
    return;
  }
  leaveRoom();
  history.replaceState(null, "", `#room=${encodeURIComponent(room)}`);
  setRoomOpen(true);
  const connection = new RoomConnection({
    room,
    tokens: state.signIn,
    socketUrl,
    closeCodes: config.closeCodes,
    catchUpPage: config.historyMaxLimit,
  });
  state.connection = connection;
  renderRooms();
  connection.addEventListener("state", (event) => {
    if (state.connection === connection) connectionState(event.detail);
  });
  connection.addEventListener("frame", (event) => {
    if (state.connection === connection) handleFrame(event.detail);
  });
  connection.open();
  $("message-input").focus();
}

// No room open: the rooms list is where to go next.
function showNoRoom() {
  leaveRoom();
  history.replaceState(null, "", location.pathname + location.search);
  setRoomOpen(false);
  renderRooms();
}

function setRoomOpen(open) {
  $("no-room").hidden = open;
  $("messages").hidden = !open;
  for (const id of ["message-input", "send", "ask-ai"]) $(id).disabled = !open;
  $("analyze").disabled = !open || state.analysing;
}

function setStatus(kind, text) {
  const status = $("connection-status");
  status.dataset.state = kind;
  status.textContent = text;
}

function connectionState({ state: kind, code, reason, delay }) {
  if (kind === "connecting") setStatus("connecting", "Connecting…");
  else if (kind === "open") {
    renderRoomHeader();
    if (state.connection.sessions > 1) addNotice("Reconnected");
    // Joining a public room makes the user a member; after a drop, rooms may have changed.
    refreshRooms();
  } else if (kind === "waiting") {
    // A socket that fell behind its room was closed by the server; reconnecting fetches
    // what it missed.
    const what = SLOW_CLOSES.has(code) ? "Connection too slow" : "Connection lost";
    setStatus("waiting", `${what}, retrying in ${Math.ceil(delay / 1000)} s…`);
  } else if (kind === "closed" && code) {
    // The close often carries no reason; a refusal's error frame, sent just before, does.
    const refusal = state.lastFrame?.type === "error" ? state.lastFrame.message : "";
    const why = reason || refusal || `close code ${code}`;
    setStatus("closed", `Disconnected: ${why}`);
    // Not retried (a room this user may not, or no longer, be in): back to the list.
    if (ROOM_REFUSED_CLOSES.has(code)) {
      showNoRoom();
      refreshRooms();
    }
  }
}

function send(frame) {
  if (state.connection?.send(frame)) return true;
  return notSent();
}

// A chat message: sent again after a reconnect until its echo arrives (connection.js).
function sendChat(frame) {
  if (state.connection?.sendMessage(frame)) return true;
  return notSent();
}

function notSent() {
  showAlert("Not connected: nothing was sent. Reconnecting…", "warning", { key: "offline" });
  return false;
}

// --- the rooms list ----------------------------------------------------------------------

function roomLabel(entry) {
  return entry.name || entry.room_id;
}

function findRoom(roomId) {
  return (
    state.myRooms.find((entry) => entry.room_id === roomId) ||
    state.publicRooms.find((entry) => entry.room_id === roomId) ||
    null
  );
}

function currentEntry() {
  const room = state.connection?.room;
  return room ? findRoom(room) || { room_id: room } : null;
}

// A room the API just answered (created or opened): listed at once, before the next refresh.
function adoptRoom(entry) {
  state.myRooms = [entry, ...state.myRooms.filter((known) => known.room_id !== entry.room_id)];
}

async function refreshRooms() {
  if (state.me === null) return;
  state.roomsLoad += 1;
  const load = state.roomsLoad;
  const [mine, open] = await Promise.allSettled([state.api.mine(), state.api.publicRooms()]);
  if (load !== state.roomsLoad) return;
  const failure = [mine, open].find((answer) => answer.status === "rejected");
  if (failure) {
    showAlert(`Could not load the rooms: ${failure.reason.message}`, "error", { key: "rooms" });
  }
  if (mine.status === "fulfilled") state.myRooms = listOf(mine.value);
  if (open.status === "fulfilled") state.publicRooms = listOf(open.value);
  // An answer asked before this page's latest `read` was stored: what it read stays read.
  const current = state.myRooms.find((known) => known.room_id === state.connection?.room);
  if (current && state.readSent >= (Number(current.last_message?.seq) || 0)) {
    current.unread_count = 0;
    current.last_read_seq = Math.max(Number(current.last_read_seq) || 0, state.readSent);
  }
  state.roomsLoaded = true;
  renderRooms();
}

function listOf(answer) {
  return Array.isArray(answer) ? answer.filter((entry) => typeof entry?.room_id === "string") : [];
}

function renderRooms() {
  renderRoomHeader();
  // Redrawn only when something changed: an entry under the pointer stays put.
  const drawn = JSON.stringify([
    state.roomsLoaded,
    state.myRooms,
    state.publicRooms,
    state.connection?.room,
  ]);
  if (drawn === state.roomsDrawn) return;
  state.roomsDrawn = drawn;
  const mine = new Set(state.myRooms.map((entry) => entry.room_id));
  $("my-rooms").replaceChildren(...state.myRooms.map((entry) => roomItem(entry, mySubtitle(entry))));
  $("public-rooms").replaceChildren(
    ...state.publicRooms
      .filter((entry) => !mine.has(entry.room_id))
      .map((entry) => roomItem(entry, publicSubtitle(entry))),
  );
  // "No rooms yet" only once the server said so, not while the first answer is awaited.
  for (const list of [$("my-rooms"), $("public-rooms")]) list.dataset.loaded = state.roomsLoaded;
}

function roomItem(entry, subtitle) {
  const button = el(
    "button",
    { className: "room-entry", data: { roomId: entry.room_id, kind: entry.kind || "" } },
    el("span", { className: "room-name", text: roomLabel(entry) }),
    el("span", { className: "room-sub", text: subtitle }),
  );
  button.type = "button";
  button.title = entry.room_id;
  if (entry.room_id === state.connection?.room) button.setAttribute("aria-current", "true");
  if (entry.unread_count > 0) {
    button.append(el("span", { className: "badge", text: entry.unread_count }));
  }
  button.addEventListener("click", () => joinRoom(entry.room_id));
  return el("li", {}, button);
}

function mySubtitle(entry) {
  const last = entry.last_message;
  const parts = [];
  if (last && typeof last === "object") {
    const author = last.user_id === AI_USER_ID ? "AI assistant" : last.username || last.user_id;
    parts.push(`${author}: ${last.content ?? "(message deleted)"}`);
  } else {
    parts.push(KIND_LABELS[entry.kind] || entry.kind || "");
  }
  if (entry.muted) parts.push("muted");
  return parts.filter(Boolean).join(" · ");
}

function publicSubtitle(entry) {
  const count = entry.member_count;
  const members = typeof count === "number" && `${count} ${count === 1 ? "member" : "members"}`;
  return [entry.description, members].filter(Boolean).join(" · ") || KIND_LABELS.public;
}

function renderRoomHeader() {
  const entry = currentEntry();
  if (state.connection?.isOpen) setStatus("open", `Connected to ${roomLabel(entry)}`);
  $("room-title").textContent = entry ? roomLabel(entry) : "No room open";
  $("room-title").dataset.roomId = entry?.room_id ?? "";
  const kind = $("room-kind");
  kind.textContent = KIND_LABELS[entry?.kind] ?? "";
  kind.hidden = !kind.textContent;
}

// Runs one API call for a form: its button is disabled meanwhile, and a failure is shown
// in the form, in the server's words.
async function submitting(form, action) {
  const problem = form.querySelector(".form-error");
  const button = form.querySelector("button[type=submit]");
  problem.hidden = true;
  button.disabled = true;
  try {
    await action();
  } catch (error) {
    problem.textContent = apiErrorText(error);
    problem.hidden = false;
  } finally {
    button.disabled = false;
  }
}

// The server's message is generic ("Invalid request", "Not allowed"); its details say what
// was wrong: the fields at fault ({loc, msg} entries), or the limit reached.
function apiErrorText(error) {
  const details = error.details ?? {};
  const problems = (Array.isArray(details.errors) ? details.errors : []).map((item) =>
    [[item?.loc ?? []].flat().join("."), item?.msg].filter(Boolean).join(": "),
  );
  if (details.limit) problems.push(`limit ${details.limit} is ${details.max}`);
  const said = problems.filter(Boolean).join("; ");
  return said ? `${error.message}: ${said}` : error.message;
}

// The open room's entry shows its newest message without waiting for the next refresh.
function noteLastMessage(frame) {
  const entry = state.myRooms.find((known) => known.room_id === state.connection?.room);
  const shown = Number(entry?.last_message?.message_id ?? 0);
  if (!entry || frame.message_id === null || Number(frame.message_id) <= shown) return;
  entry.last_message = frame;
  renderRooms();
}

function openedRoom(form, entry) {
  form.reset();
  form.closest("details").open = false;
  adoptRoom(entry);
  joinRoom(entry.room_id);
  refreshRooms();
}

function wireRooms() {
  $("rooms-refresh").addEventListener("click", refreshRooms);
  $("new-room-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const name = $("new-room-name").value.trim();
    // The creator is the owner anyway.
    const members = [...new Set($("new-room-members").value.split(/[\s,]+/))].filter(
      (uid) => uid && uid !== state.me.uid,
    );
    submitting(form, async () => openedRoom(form, await state.api.create({ name, members })));
  });
  $("direct-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    const userId = $("direct-user").value.trim();
    submitting(form, async () => openedRoom(form, await state.api.direct(userId)));
  });
}

// --- inbound frames -----------------------------------------------------------------------

const handlers = {
  connection_ack(frame) {
    streams.idleMs = idleTimeoutMs(frame.server_info?.stream_idle_timeout);
  },
  presence(frame) {
    state.presence = new Map(frame.users.map((user) => [user.user_id, user]));
    renderPresence();
  },
  user_joined(frame) {
    const known = state.presence.get(frame.user_id);
    state.presence.set(frame.user_id, known || { ...frame, connection_count: 1 });
    renderPresence();
  },
  user_left(frame) {
    state.presence.delete(frame.user_id);
    setTyping(frame.user_id, null);
    renderPresence();
  },
  history(frame) {
    frame.messages.forEach(addMessage);
    if (frame.messages.length) noteLastMessage(frame.messages.at(-1));
    noteRead();
  },
  read(frame) {
    if (frame.room_id !== state.connection?.room) return;
    if (frame.user_id === state.me?.uid) {
      // Read on another of the user's devices: nothing left unread here either.
      state.readSent = Math.max(state.readSent, Number(frame.seq) || 0);
      markRoomRead(frame.seq);
      return;
    }
    const seq = Math.max(state.readBy.get(frame.user_id) ?? 0, Number(frame.seq) || 0);
    state.readBy.set(frame.user_id, seq);
    renderReceipts();
  },
  message(frame) {
    if (state.lastSent && frame.client_message_id === state.lastSent.clientId) {
      state.lastSent = null;
    }
    // An analysis narrative (private, never stored) is the insight text the health panel
    // shows: it ends the narrative being written there, if any.
    if (frame.metadata?.analysis) {
      narrativeWritten(frame);
      return;
    }
    addMessage(frame);
    noteLastMessage(frame);
    noteRead();
  },
  message_updated(frame) {
    const shown = state.messages.get(frame.message_id);
    if (!shown) return; // not shown here: history brings it in its current state
    const metadata = { ...(shown.frame.metadata || {}), edited_at: frame.edited_at };
    const content = frame.content;
    updateMessage(shown, { ...shown.frame, content, metadata, changed_seq: frame.seq });
  },
  message_deleted(frame) {
    const shown = state.messages.get(frame.message_id);
    if (!shown) return;
    const metadata = { deleted_at: frame.timestamp };
    updateMessage(shown, { ...shown.frame, content: null, metadata, changed_seq: frame.seq });
  },
  assistant_delta(frame) {
    // A reply belongs to this room; an analysis narrative to no room (this user's own).
    const room = frame.kind === "reply" ? state.connection?.room : null;
    if ((frame.room_id ?? null) !== room) return;
    streams.receive(frame);
  },
  system(frame) {
    addNotice(frame.content);
  },
  typing(frame) {
    if (frame.user_id === state.me?.uid) return;
    setTyping(frame.user_id, frame.is_typing ? frame.username : null);
  },
  analysis_update: showProgress,
  health_insight: showInsight,
  error: showError,
};

function handleFrame(frame) {
  state.lastFrame = frame;
  handlers[frame.type]?.(frame);
}

function showError(frame) {
  // A catch-up read refused: the connection asks again by itself; nothing the user did.
  if (frame.details?.scope === "catch_up") return;
  if (frame.details?.scope === "read") {
    // Told again once the server takes it (a later `read` carries the position on).
    state.readSent = 0;
    state.readSentAt = Date.now() + Number(frame.details.retry_after || 1) * 1000;
    noteRead();
    return;
  }
  if (frame.error_code === "RATE_LIMIT_EXCEEDED" && frame.details?.retry_after) {
    rateLimited(Number(frame.details.retry_after));
    return;
  }
  if (frame.error_code === "ROOM_FORBIDDEN") {
    // The server gives the same answer whether the room exists or not.
    showAlert("You are not a member of this room (or it does not exist).", "error", {
      key: "room",
    });
    return;
  }
  showAlert(`${frame.error_code}: ${frame.message}`);
  if (frame.error_code === "HEALTH_ANALYSIS_ERROR") {
    analysisDone();
    endNarratives("failed");
  }
}

function rateLimited(seconds) {
  state.sendBlockedUntil = Date.now() + seconds * 1000;
  const input = $("message-input");
  if (state.lastSent) {
    // Refused, not stored: back in the input for the user to send again, not re-sent.
    state.connection?.forgetMessage(state.lastSent.clientId);
    if (!input.value) input.value = state.lastSent.content;
  }
  state.lastSent = null;
  const alert = showAlert("", "warning", { key: "rate-limit", timeout: 0 });
  const text = alert.querySelector("span");
  const tick = () => {
    const left = Math.ceil((state.sendBlockedUntil - Date.now()) / 1000);
    if (left <= 0) {
      alert.remove();
      return;
    }
    text.textContent = `You are sending too fast (rate limit). You can send again in ${left} s.`;
    setTimeout(tick, 1000);
  };
  tick();
}

// --- messages -----------------------------------------------------------------------------

function messageElement(frame) {
  const mine = frame.user_id === state.me?.uid;
  const fromAi = frame.user_id === AI_USER_ID;
  // A deleted (or erased) message keeps its place in history without its content (§12).
  const deleted = frame.content === null;
  const classes = ["message", mine && "mine", fromAi && "ai", deleted && "deleted"];
  const author = fromAi ? "AI assistant" : frame.username || frame.user_id;
  const meta = el(
    "div",
    { className: "meta" },
    el("span", { className: "author", text: author }),
    el("time", { text: clockTime(frame.timestamp) }),
  );
  if (frame.metadata?.edited_at) meta.append(el("span", { className: "edited", text: "edited" }));
  const li = el(
    "li",
    { className: classes.filter(Boolean).join(" ") },
    meta,
    el("p", { className: "body", text: deleted ? "(message deleted)" : frame.content }),
  );
  li.dataset.userId = frame.user_id;
  if (frame.message_id !== null) li.dataset.messageId = frame.message_id;
  const question = frame.metadata?.in_reply_to;
  if (fromAi && question != null) li.dataset.inReplyTo = question;
  if (frame.seq != null) li.dataset.seq = frame.seq;
  if (frame.message_id !== null && !deleted) meta.append(...messageActions(frame, mine));
  return li;
}

// Edit on the user's own messages; delete on their own, and on anyone's for a moderator or
// owner of a public or private room (protocol §12: the server decides all the same).
function messageActions(frame, mine) {
  const entry = currentEntry();
  const moderates =
    ["owner", "moderator"].includes(entry?.role) && ["public", "private"].includes(entry?.kind);
  const actions = [];
  if (mine && frame.user_id !== AI_USER_ID) {
    actions.push(actionButton("Edit", "edit", () => editMessage(frame)));
  }
  if (mine || moderates) actions.push(actionButton("Delete", "delete", () => deleteMessage(frame)));
  return actions;
}

function actionButton(text, action, onClick) {
  const button = el("button", { className: "message-action", text, data: { action } });
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

function editMessage(frame) {
  const shown = state.messages.get(frame.message_id)?.frame ?? frame;
  const content = window.prompt("Edit your message", shown.content ?? "");
  if (content === null || !content.trim() || content === shown.content) return;
  send({ type: "edit", message_id: frame.message_id, content });
}

function deleteMessage(frame) {
  if (!window.confirm("Delete this message for everyone?")) return;
  send({ type: "delete", message_id: frame.message_id });
}

// Stored messages are shown once each, in the order of their seq (protocol §15): a message
// may arrive twice (join history and live, a catch-up page, the echo of a message sent again
// after a reconnect), frames may arrive out of order (the page puts each in its place), and
// a catch-up page may bring a message again in a later state (edited, deleted): it is shown
// in that state where it was. An assistant's reply that was shown as it was written (§14)
// takes the place of its partial text, live or from a catch-up page.
function addMessage(frame) {
  const id = frame.message_id;
  const streamId = frame.user_id === AI_USER_ID ? frame.metadata?.stream_id : null;
  const stream = streams.finish(streamId, "reply"); // the reply shown as it was written
  const shown = id === null ? undefined : state.messages.get(id);
  if (shown) {
    stream?.view?.remove();
    updateMessage(shown, frame);
    return;
  }
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const li = messageElement(frame);
  const seq = Number(frame.seq) || 0;
  if (stream?.view?.isConnected) stream.view.replaceWith(li);
  else if (id === null || seq > state.newestSeq) list.append(li);
  else list.insertBefore(li, nextShown(seq)?.li ?? null);
  if (id !== null) {
    state.messages.set(id, { li, seq, latest: latestSeq(frame) ?? 0, frame });
    state.newestSeq = Math.max(state.newestSeq, seq);
  }
  if (atBottom || frame.user_id === state.me?.uid) list.scrollTop = list.scrollHeight;
  if (state.readBy.size) renderReceipts();
}

// The shown message that comes right after `seq`.
function nextShown(seq) {
  let next = null;
  for (const entry of state.messages.values()) {
    if (entry.seq > seq && (next === null || entry.seq < next.seq)) next = entry;
  }
  return next;
}

// A message shown already, seen again: redrawn if this is a later state of it.
function updateMessage(shown, frame) {
  const latest = latestSeq(frame) ?? 0;
  if (latest <= shown.latest) return;
  const li = messageElement(frame);
  shown.li.replaceWith(li);
  shown.li = li;
  shown.latest = latest;
  shown.frame = frame;
  if (state.readBy.size) renderReceipts();
}

// --- the assistant writing (protocol §14) -------------------------------------------------

function showStream(stream) {
  if (stream.kind === "analysis") {
    showNarrative(stream);
    return;
  }
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  if (stream.view === null) {
    stream.view = streamElement(stream);
    list.append(stream.view);
  }
  stream.view.querySelector(".body").textContent = stream.text;
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function dropStream(stream) {
  if (stream.kind === "analysis") dropNarrative(stream);
  else stream.view?.remove();
  stream.view = null;
}

// A reply being written: shaped like the assistant's messages, marked as being written, with
// no message id (nothing is stored yet) and no actions.
function streamElement(stream) {
  const meta = el(
    "div",
    { className: "meta" },
    el("span", { className: "author", text: "AI assistant" }),
    el("time", { text: clockTime(stream.startedAt) }),
    el("span", { className: "writing", text: "writing…" }),
  );
  const li = el(
    "li",
    { className: "message ai streaming", data: { userId: AI_USER_ID, streamId: stream.id } },
    meta,
    el("p", { className: "body" }),
  );
  if (stream.inReplyTo !== null) li.dataset.inReplyTo = stream.inReplyTo;
  li.setAttribute("aria-busy", "true");
  return li;
}

function addNotice(text) {
  const list = $("messages");
  list.append(el("li", { className: "notice", text }));
  list.scrollTop = list.scrollHeight;
}

// --- what has been read (protocol §12) -----------------------------------------------------

const READ_SPACING = 1000; // ms: at most one `read` a second while the room is read

// The room is being read (its page visible): tell the server how far, at most once a
// second. `contiguous` is what the connection has seen of the room with no gap before it.
function noteRead() {
  const connection = state.connection;
  if (!connection?.isOpen || document.visibilityState !== "visible") return;
  const seq = connection.contiguous;
  if (seq <= state.readSent || state.readTimer !== null) return;
  const wait = state.readSentAt + READ_SPACING - Date.now();
  if (wait > 0) {
    state.readTimer = setTimeout(() => {
      state.readTimer = null;
      noteRead();
    }, wait);
    return;
  }
  if (!connection.send({ type: "read", seq })) return;
  state.readSent = seq;
  state.readSentAt = Date.now();
  markRoomRead(seq);
}

// The rooms list without this room's badge: read up to `seq`.
function markRoomRead(seq) {
  const entry = state.myRooms.find((known) => known.room_id === state.connection?.room);
  if (!entry) return;
  entry.last_read_seq = Math.max(Number(entry.last_read_seq) || 0, Number(seq) || 0);
  entry.unread_count = 0;
  renderRooms();
}

// Read ticks on the user's own messages in a direct room: "Read" once the other member's
// receipt reaches the message's seq.
function renderReceipts() {
  if (currentEntry()?.kind !== "direct") return;
  const readUpTo = Math.max(0, ...state.readBy.values());
  for (const { li, seq } of state.messages.values()) {
    if (li.dataset.userId !== state.me?.uid) continue;
    const read = seq > 0 && seq <= readUpTo;
    let tick = li.querySelector(".receipt");
    if (!read) {
      tick?.remove();
      continue;
    }
    if (!tick) {
      tick = el("span", { className: "receipt", text: "✓✓ Read" });
      tick.title = "Read";
      li.querySelector(".meta").append(tick);
    }
  }
}

// --- presence and typing ------------------------------------------------------------------

function renderPresence() {
  const users = [...state.presence.values()];
  $("online-count").textContent = `${users.length} online`;
  $("presence").replaceChildren(
    ...users.map((user) => {
      const name = user.username || user.user_id;
      const avatar = el("span", { className: "avatar", text: initial(name) });
      avatar.style.setProperty("--hue", hue(user.user_id));
      const li = el("li", { data: { userId: user.user_id } }, avatar);
      li.title = user.user_id;
      li.append(el("span", { className: "name", text: name }));
      if (user.user_id === state.me?.uid) li.append(el("span", { className: "you", text: "(you)" }));
      if (user.connection_count > 1) {
        li.append(el("span", { className: "muted", text: `${user.connection_count} devices` }));
      }
      return li;
    }),
  );
}

function setTyping(userId, username) {
  clearTimeout(state.typing.get(userId)?.timer);
  if (username === null) {
    state.typing.delete(userId);
  } else {
    const timer = setTimeout(() => setTyping(userId, null), OTHERS_TYPING_EXPIRY_MS);
    state.typing.set(userId, { username, timer });
  }
  renderTyping();
}

function renderTyping() {
  const names = [...state.typing.values()].map((entry) => entry.username);
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = "Several people are typing…";
  $("typing").textContent = text;
}

// --- composing ----------------------------------------------------------------------------

function typed() {
  clearTimeout(state.typingIdleTimer);
  if (!$("message-input").value.trim()) {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (now - state.typingSentAt > TYPING_REFRESH_MS && state.connection?.isOpen) {
    state.connection.send({ type: "typing", is_typing: true });
    state.typingSentAt = now;
  }
  state.typingIdleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(state.typingIdleTimer);
  if (state.typingSentAt) {
    state.typingSentAt = 0;
    state.connection?.send({ type: "typing", is_typing: false });
  }
}

function sendMessage(content) {
  if (!content) return;
  const wait = Math.ceil((state.sendBlockedUntil - Date.now()) / 1000);
  if (wait > 0) {
    showAlert(`Rate limit: you can send again in ${wait} s.`, "warning", { key: "rate-limit" });
    return;
  }
  state.clientSeq += 1;
  const clientId = `c-${Date.now().toString(36)}-${state.clientSeq}`;
  if (!sendChat({ type: "message", content, message_id: clientId })) return;
  state.lastSent = { clientId, content };
  $("message-input").value = "";
  stopTyping();
}

function wireComposer() {
  const input = $("message-input");
  input.addEventListener("input", typed);
  input.addEventListener("blur", stopTyping);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage(input.value.trim());
  });
  $("ask-ai").addEventListener("click", () => {
    const question = input.value.trim();
    if (!question) {
      input.value = `${AI_MENTION} `;
      input.focus();
      return;
    }
    const mentioned = question.slice(0, AI_MENTION.length).toLowerCase() === AI_MENTION;
    sendMessage(mentioned ? question : `${AI_MENTION} ${question}`);
  });
}

// --- health analysis ----------------------------------------------------------------------

async function analyzeSample() {
  const button = $("analyze");
  state.analysing = true;
  button.disabled = true;
  $("insight").hidden = true;
  $("analysis-progress").value = 0;
  $("analysis-status").textContent = "Loading sample data…";
  try {
    const response = await fetch(config.sampleDataUrl);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const sample = await response.json();
    const points = sample.data_points;
    if (!send({ type: "health_insight", content: { data_points: points } })) {
      throw new Error("not connected");
    }
    $("analysis-status").textContent = `Sent ${points.length.toLocaleString()} data points…`;
  } catch (error) {
    $("analysis-status").textContent = `Could not start: ${error.message}`;
    analysisDone();
  }
}

function analysisDone() {
  state.analysing = false;
  $("analyze").disabled = state.connection === null;
}

function showProgress(frame) {
  $("analysis-progress").value = frame.progress;
  $("analysis-status").textContent = `${frame.status} · ${frame.progress}%`;
  $("analysis-status").dataset.status = frame.status;
  if (frame.status === "completed" || frame.status === "failed") analysisDone();
  if (frame.status === "failed") endNarratives("failed");
}

// An analysis narrative being written: the insight's text in the health panel, its metrics and
// recommendations to come with the insight. One at a time: a newer one takes its place.
function showNarrative(stream) {
  if (stream.view === null) {
    for (const other of streams.streams("analysis")) {
      if (other !== stream) streams.end(other, "replaced");
    }
    $("insight-summary").hidden = true;
    $("insight-writing").hidden = false;
    $("insight").hidden = false;
    stream.view = $("insight-text");
  }
  const text = stream.view;
  const atBottom = text.scrollHeight - text.scrollTop - text.clientHeight < 20;
  text.textContent = stream.text;
  if (atBottom) text.scrollTop = text.scrollHeight;
}

function dropNarrative(stream) {
  if (stream.view === null) return;
  $("insight").hidden = true;
  $("insight-writing").hidden = true;
  $("insight-text").textContent = "";
}

// The narrative's message: its text replaces what was shown as it was written.
function narrativeWritten(frame) {
  const stream = streams.finish(frame.metadata?.stream_id, "analysis");
  if (stream?.view == null) return;
  $("insight-writing").hidden = true;
  if (typeof frame.content === "string") $("insight-text").textContent = frame.content;
}

function endNarratives(why) {
  for (const stream of streams.streams("analysis")) streams.end(stream, why);
}

function showInsight(frame) {
  // The insight's text is the narrative: the one being written, if any, is done.
  for (const stream of streams.streams("analysis")) streams.finish(stream.id, "analysis");
  $("insight-writing").hidden = true;
  $("insight-summary").hidden = false;
  const metrics = frame.source_data || {};
  $("insight-metrics").replaceChildren(
    ...METRICS.filter(([key]) => typeof metrics[key] === "number").map(([key, label, format]) =>
      el("div", { data: { metric: key } }, el("dt", { text: label }), el("dd", { text: format(metrics[key]) })),
    ),
  );
  $("insight-text").textContent = frame.insight;
  const recommendations = frame.recommendations?.length
    ? frame.recommendations
    : ["No specific recommendations this time."];
  $("insight-recommendations").replaceChildren(...recommendations.map((text) => el("li", { text })));
  $("insight").hidden = false;
}

// --- start --------------------------------------------------------------------------------

async function start() {
  wireComposer();
  wireRooms();
  $("analyze").addEventListener("click", analyzeSample);
  window.addEventListener("online", () => state.connection?.retryNow());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refreshRooms();
    noteRead();
  });
  window.addEventListener("focus", noteRead);
  window.addEventListener("hashchange", () => {
    const room = roomInAddress();
    if (state.me && room && room !== state.connection?.room) joinRoom(room);
  });
  // The sign-in card stays hidden until a returning user's sign-in has been tried, so it
  // never shows (and takes input) only to vanish.
  state.signIn = await createSignIn();
  if (state.signIn === null) {
    $("sign-in").hidden = false;
    return;
  }
  state.api = new RoomsApi({ base: config.apiBase, tokens: state.signIn });
  wireSignIn();
  state.signIn.addEventListener("token", (event) => state.connection?.updateToken(event.detail));
  try {
    const user = await state.signIn.restore();
    if (user) signedIn(user);
    else $("sign-in").hidden = false;
  } catch (error) {
    $("sign-in").hidden = false;
    showAlert(`Sign-in is unavailable: ${error.message}`);
  }
}

start();
