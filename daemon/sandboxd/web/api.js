// The daemon's HTTP side for the page: the token (kept for this tab only, never in a
// cookie or a query string) and GET requests that carry it in X-Api-Key. Plus the small
// text helpers the protocol needs.

const TOKEN_KEY = "sandboxd.token";
const SUBPROTOCOL = "sandboxd.v1";
const TOKEN_SUBPROTOCOL = "sandboxd.token.";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Length of `text` in UTF-8 bytes: the unit of the protocol's offsets. */
export function utf8len(text) {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00) { n += 4; i++; }
    else n += 3;
  }
  return n;
}

/** `text` without its first `bytes` UTF-8 bytes (always a code-point boundary here). */
export function dropUtf8(text, bytes) {
  return decoder.decode(encoder.encode(text).subarray(bytes));
}

export function base64url(text) {
  let binary = "";
  for (const byte of encoder.encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs https
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function openSafely(uri) {
  // Only web links, in a new tab that cannot reach back into this one.
  if (/^https?:\/\//i.test(uri)) window.open(uri, "_blank", "noopener,noreferrer");
}


let token = sessionStorage.getItem(TOKEN_KEY) || "";

/** `/#token=...` (the fragment never reaches the server): keep it for this tab, then drop
 * it from the address bar and the history. */
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("token")) return;
  token = params.get("token");
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}

export class AuthError extends Error {}

export async function api(path) {
  const headers = token ? { "X-Api-Key": token } : {};
  let response;
  try {
    response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  } catch (error) {
    throw new Error(`sandboxd is unreachable (${error.message})`);
  }
  if (response.status === 401) {
    throw new AuthError(
      token
        ? "The token was refused: sandboxd answered 401 Unauthorized. Check it and try again."
        : "This sandboxd requires a token.",
    );
  }
  if (response.status === 429) {
    const wait = response.headers.get("retry-after") || "some";
    throw new AuthError(
      `Too many failed attempts from this address: sandboxd refuses every request for ${wait} s more (429).`,
    );
  }
  if (!response.ok) throw new Error(`${path} answered HTTP ${response.status}`);
  return response.json();
}

export function setToken(value) {
  token = value;
  sessionStorage.setItem(TOKEN_KEY, token);
}

/** The subprotocols a browser WebSocket offers: browsers cannot set X-Api-Key there, so
 * the token rides as `sandboxd.token.<base64url>`; the daemon answers `sandboxd.v1`. */
export function socketProtocols() {
  return token ? [SUBPROTOCOL, TOKEN_SUBPROTOCOL + base64url(token)] : [SUBPROTOCOL];
}
