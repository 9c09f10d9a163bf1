// The admin API, read with the session cookie (sent by the browser, unreadable here).

export class SignedOut extends Error {}

/** Calls the admin API; throws SignedOut on 401 and Error(message) on other failures. */
export async function admin(method, path) {
  const reply = await fetch(path, {
    method,
    credentials: "same-origin",
    // Changes made with the cookie must carry this header (the server's CSRF guard).
    headers: { "X-Lightpd-Dashboard": "1" },
  });
  if (reply.status === 401) throw new SignedOut();
  const body = await reply.json().catch(() => null);
  if (!reply.ok) {
    throw new Error(body?.error?.message ?? `HTTP ${reply.status}`);
  }
  return body;
}

export async function signOut() {
  await fetch("/dashboard/session", { method: "DELETE", credentials: "same-origin" });
}
