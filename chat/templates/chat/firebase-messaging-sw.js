// Clarity Chat's service worker for web push (protocol §13): FCM's messages that arrive
// while no page of the site is open are shown by the Firebase SDK (from their
// `notification`: "Clarity" / "New message", or a preview the user asked for); a click
// opens the room named in their data. Rendered by chat/web.py with the web app's options.
importScripts({{ sdk|safe }} + "/firebase-app-compat.js", {{ sdk|safe }} + "/firebase-messaging-compat.js");

firebase.initializeApp({{ options|safe }});
firebase.messaging();

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const data = event.notification.data?.FCM_MSG?.data ?? event.notification.data ?? {};
  const room = typeof data.room_id === "string" ? data.room_id : "";
  const url = room ? `/#room=${encodeURIComponent(room)}` : "/";
  event.waitUntil(self.clients.openWindow(url));
});
