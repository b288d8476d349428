// Where the WebSocket token comes from. Every sign-in method gives the same interface:
//   restore() → Promise<user | null>   the user of an earlier sign-in in this tab, if any
//   user                                {uid, name} once signed in
//   getToken(force) → Promise<string>   a valid ID token (a new one when `force`)
//   signOut() → Promise<void>
// and dispatches "token" (detail: the token) when it refreshed the token by itself, so an
// open session can be told (protocol §2, `auth`) before the old token expires.

const REFRESH_BEFORE_EXPIRY_MS = 5 * 60 * 1000;

// The token's `exp` in ms since the epoch (0 if unreadable). Only to schedule refreshes: the
// server verifies the token, the client never trusts what it reads here.
export function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).exp * 1000;
  } catch {
    return 0;
  }
}

// Development only (emulator mode with DEBUG): POST a name to the dev token endpoint, get an
// emulator token for a uid derived from that name. The name is kept for this tab only, so a
// reload signs in again by itself.
export class DevSignIn extends EventTarget {
  static STORAGE_KEY = "clarity.devName";

  constructor({ tokenUrl, csrfToken }) {
    super();
    this.tokenUrl = tokenUrl;
    this.csrfToken = csrfToken;
    this.user = null;
    this.name = null;
    this.token = null;
    this.refreshTimer = null;
  }

  async restore() {
    const name = sessionStorage.getItem(DevSignIn.STORAGE_KEY);
    if (!name) return null;
    try {
      return await this.signIn(name);
    } catch {
      sessionStorage.removeItem(DevSignIn.STORAGE_KEY);
      return null;
    }
  }

  async signIn(name) {
    const answer = await this.requestToken(name);
    this.name = name;
    this.user = { uid: answer.user_id, name: answer.username };
    this.setToken(answer.token);
    sessionStorage.setItem(DevSignIn.STORAGE_KEY, name);
    return this.user;
  }

  async getToken(force = false) {
    if (this.name === null) throw new Error("not signed in");
    if (force || tokenExpiry(this.token) - Date.now() < REFRESH_BEFORE_EXPIRY_MS) {
      this.setToken((await this.requestToken(this.name)).token);
    }
    return this.token;
  }

  async signOut() {
    clearTimeout(this.refreshTimer);
    sessionStorage.removeItem(DevSignIn.STORAGE_KEY);
    this.user = this.name = this.token = null;
  }

  async requestToken(name) {
    const body = new FormData();
    body.set("name", name);
    const response = await fetch(this.tokenUrl, {
      method: "POST",
      body,
      headers: { "X-CSRFToken": this.csrfToken },
      credentials: "same-origin",
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.error || `sign-in failed (HTTP ${response.status})`);
    return answer;
  }

  setToken(token) {
    this.token = token;
    clearTimeout(this.refreshTimer);
    const delay = tokenExpiry(token) - Date.now() - REFRESH_BEFORE_EXPIRY_MS;
    if (delay <= 0) return;
    this.refreshTimer = setTimeout(async () => {
      try {
        const fresh = await this.getToken(true);
        this.dispatchEvent(new CustomEvent("token", { detail: fresh }));
      } catch {
        // The next (re)connection asks for a token again.
      }
    }, delay);
  }
}
