// Sign-in with Google through the Firebase JS SDK (real Firebase: not emulator mode, and
// FIREBASE_WEB_API_KEY set). Loaded only in that case; the SDK's ES modules come from
// FIREBASE_JS_SDK_URL (Google's CDN by default). Same interface as signin.js's DevSignIn.
// The SDK keeps the user signed in across reloads and refreshes the ID token itself; each
// refresh is passed on as a "token" event.

export class FirebaseSignIn extends EventTarget {
  constructor({ sdkUrl, apiKey, authDomain, projectId, webPush = null }) {
    super();
    this.sdkUrl = sdkUrl;
    this.options = { apiKey, authDomain, projectId };
    // Web push (protocol §13): the web app's messaging options, the VAPID key, the worker.
    this.webPush = webPush;
    if (webPush) {
      this.options.messagingSenderId = webPush.messagingSenderId;
      this.options.appId = webPush.appId;
    }
    this.app = null;
    this.sdk = null;
    this.auth = null;
    this.user = null;
    this.current = null;
  }

  async load() {
    if (this.sdk !== null) return;
    const [app, auth] = await Promise.all([
      import(`${this.sdkUrl}/firebase-app.js`),
      import(`${this.sdkUrl}/firebase-auth.js`),
    ]);
    this.sdk = auth;
    this.app = app.initializeApp(this.options);
    this.auth = auth.getAuth(this.app);
    auth.onIdTokenChanged(this.auth, async (user) => {
      if (user === null || this.current === null || user.uid !== this.current.uid) return;
      this.dispatchEvent(new CustomEvent("token", { detail: await user.getIdToken() }));
    });
  }

  async restore() {
    await this.load();
    await this.auth.authStateReady();
    return this.adopt(this.auth.currentUser);
  }

  async signIn() {
    await this.load();
    const result = await this.sdk.signInWithPopup(this.auth, new this.sdk.GoogleAuthProvider());
    return this.adopt(result.user);
  }

  adopt(firebaseUser) {
    this.current = firebaseUser;
    this.user = firebaseUser && {
      uid: firebaseUser.uid,
      name: firebaseUser.displayName || firebaseUser.email || firebaseUser.uid,
    };
    return this.user;
  }

  async getToken(force = false) {
    if (this.current === null) throw new Error("not signed in");
    return this.current.getIdToken(force);
  }

  // This browser's FCM registration token for web push, once the user allowed
  // notifications (null where web push is not configured or not supported).
  async pushToken() {
    if (!this.webPush || !("serviceWorker" in navigator) || !("Notification" in window)) {
      return null;
    }
    await this.load();
    const messaging = await import(`${this.sdkUrl}/firebase-messaging.js`);
    const registration = await navigator.serviceWorker.register(this.webPush.serviceWorker);
    return messaging.getToken(messaging.getMessaging(this.app), {
      vapidKey: this.webPush.vapidKey,
      serviceWorkerRegistration: registration,
    });
  }

  async signOut() {
    this.adopt(null);
    if (this.auth !== null) await this.sdk.signOut(this.auth);
  }
}
