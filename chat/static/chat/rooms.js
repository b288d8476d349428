// The rooms API of protocol §11 over HTTP: the user's rooms, the public rooms, a new private
// room, a direct room with another user. Authenticated with the same ID token the socket
// uses (Bearer); the session cookie is not sent, so the token is the only credential.

export class ApiError extends Error {
  // status: the HTTP status (0: the server was not reached); code: the server's error_code.
  constructor(status, code, message, details = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export class RoomsApi {
  // base: the API's path, ending in "/"; tokens: {getToken(force) → Promise<string>}.
  constructor({ base, tokens }) {
    this.base = base;
    this.tokens = tokens;
  }

  // [{room_id, name, kind, role, muted, unread_count, last_read_seq, last_message}]
  mine() {
    return this.request("GET", "rooms");
  }

  // [{room_id, name, kind, member_count}]: the public rooms the user may join.
  publicRooms() {
    return this.request("GET", "rooms?kind=public");
  }

  // The new private room, the caller its owner.
  create({ name, members }) {
    return this.request("POST", "rooms", { name, kind: "private", members });
  }

  // The direct room of the caller and that user (the same one every time).
  direct(userId) {
    return this.request("POST", "rooms/direct", { user_id: userId });
  }

  // Push notifications (protocol §13): this device's FCM token, for the caller.
  registerDevice(token, platform = "web") {
    return this.request("POST", "devices", { token, platform });
  }

  // {removed}: the token in the body, never the URL.
  removeDevice(token) {
    return this.request("DELETE", "devices", { token });
  }

  async request(method, path, body, retried = false) {
    const token = await this.tokens.getToken(retried);
    const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "omit",
      });
    } catch (error) {
      throw new ApiError(0, "NETWORK", `The server could not be reached (${error.message}).`);
    }
    const answer = await response.json().catch(() => null);
    if (response.ok) return answer;
    // A token that expired since it was handed out: once more with a fresh one.
    if (response.status === 401 && !retried) return this.request(method, path, body, true);
    throw new ApiError(
      response.status,
      answer?.error_code ?? `HTTP_${response.status}`,
      answer?.message || `The server answered HTTP ${response.status}.`,
      answer?.details ?? null,
    );
  }
}
