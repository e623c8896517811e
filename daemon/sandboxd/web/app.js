// The browser terminal of sandboxd: the session list (GET /sessions) and one xterm.js
// terminal bound to one session over /execute/ws (protocol.md section 2).
//
// Output is kept exactly once: the page counts, per stream, the byte offset up to which it
// has written output to the terminal, and every (re)attachment is a `reconnect` from those
// offsets. The offsets and the text they cover are kept in sessionStorage, so a reload puts
// the same text back and resumes from the same offsets. Attached sessions are read-only
// (`reconnect` with `watch: true`, which the daemon enforces) until typing is turned on.
//
// No inline script, no eval, no innerHTML: everything from the daemon is set as text.

import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import { WebLinksAddon } from "./vendor/addon-web-links.mjs";
import { SearchAddon } from "./vendor/addon-search.mjs";

const TOKEN_KEY = "sandboxd.token";
const VIEW_KEY = "sandboxd.view";
const SUBPROTOCOL = "sandboxd.v1";
const TOKEN_SUBPROTOCOL = "sandboxd.token.";
const LIST_INTERVAL_MS = 2000;
const SAVE_INTERVAL_MS = 250;
const RESIZE_DEBOUNCE_MS = 80;
const BACKOFF_S = [0.25, 0.5, 1, 2, 4, 8];
/** Characters of shown output kept for a reload (sessionStorage holds a few MB per origin). */
const SHOWN_LIMIT = 1_000_000;
const NEW_SHELL = {
  command: 'exec "${SHELL:-/bin/bash}" -l',
  pty: true,
  timeout_seconds: 0,
  idle_timeout_seconds: 3600,
  ttl_seconds: 600,
  kill_on_disconnect: false,
  run_config: { env_vars: { TERM: "xterm-256color", COLORTERM: "truecolor" } },
};

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---- small helpers ------------------------------------------------------------------

/** Length of `text` in UTF-8 bytes: the unit of the protocol's offsets. */
function utf8len(text) {
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
function dropUtf8(text, bytes) {
  return decoder.decode(encoder.encode(text).subarray(bytes));
}

function base64url(text) {
  let binary = "";
  for (const byte of encoder.encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs https
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function setStatus(text, bad = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
}

function openSafely(uri) {
  // Only web links, in a new tab that cannot reach back into this one.
  if (/^https?:\/\//i.test(uri)) window.open(uri, "_blank", "noopener,noreferrer");
}

// ---- the token ------------------------------------------------------------------------

let token = sessionStorage.getItem(TOKEN_KEY) || "";

/** `/#token=...` (the fragment never reaches the server): keep it for this tab, then drop
 * it from the address bar and the history. */
function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("token")) return;
  token = params.get("token");
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}

class AuthError extends Error {}

async function api(path) {
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

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message;
  $("login-token").value = "";
  $("login-token").focus();
  setStatus("not connected", true);
}

// ---- the terminal ---------------------------------------------------------------------

const term = new Terminal({
  scrollback: 10000,
  cursorBlink: true,
  fontFamily: "ui-monospace, 'DejaVu Sans Mono', monospace",
  fontSize: 14,
  theme: { background: "#000000" },
  linkHandler: { activate: (_event, uri) => openSafely(uri), allowNonHttpProtocols: false },
});
const fit = new FitAddon();
const search = new SearchAddon();
term.loadAddon(fit);
term.loadAddon(search);
term.loadAddon(new WebLinksAddon((_event, uri) => openSafely(uri)));
let renderer = "dom";

async function tryWebgl() {
  // WebGL only where a WebGL2 context exists; the DOM renderer stays otherwise, and comes
  // back if the GPU context is lost.
  try {
    if (!document.createElement("canvas").getContext("webgl2")) return;
    const { WebglAddon } = await import("./vendor/addon-webgl.mjs");
    const webgl = new WebglAddon();
    webgl.onContextLoss(() => {
      webgl.dispose();
      renderer = "dom";
    });
    term.loadAddon(webgl);
    renderer = "webgl";
  } catch (error) {
    renderer = "dom";
  }
}

/** The terminal's text, wrapped lines joined (what a reader sees, for tests too). */
function screenText() {
  const buffer = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) {
    const line = buffer.getLine(i);
    if (!line) continue;
    const text = line.translateToString(true);
    if (line.isWrapped && lines.length) lines[lines.length - 1] += text;
    else lines.push(text);
  }
  while (lines.length && lines[lines.length - 1] === "") lines.pop();
  return lines.join("\n");
}

// ---- the view: which session, which mode, what has been shown -----------------------

/** The session on screen; null before one is opened. */
let view = null;
/** The connection currently trusted for output; frames of any other one are ignored. */
let conn = null;
let reconnectTimer = null;
let attempt = 0;
let saveTimer = null;
let suppressInput = false;
const stats = { overlaps: 0, gaps: 0, connects: 0, refusals: [] };

function newView(id, fields) {
  return {
    id,
    command: fields.command || "",
    pty: fields.pty !== false,
    mode: fields.mode || "watch",
    offsets: { stdout: 0, stderr: 0 },
    shown: "",
    ended: false,
    started: false, // whether the daemon ever acknowledged this id to this view
    create: fields.create || null, // the execute frame of a shell this page starts
  };
}

function save() {
  saveTimer = null;
  if (!view) {
    sessionStorage.removeItem(VIEW_KEY);
    return;
  }
  const { create, ...kept } = view;
  kept.create = view.started ? null : create;
  for (const shown of [view.shown, view.shown.slice(-SHOWN_LIMIT / 4), null]) {
    try {
      // Without its text a view is kept from offset 0: a reload then replays it all.
      const record = shown === null ? { ...kept, shown: "", offsets: { stdout: 0, stderr: 0 }, replay: true } : { ...kept, shown };
      sessionStorage.setItem(VIEW_KEY, JSON.stringify(record));
      return;
    } catch (error) {
      // quota: try with less
    }
  }
}

function scheduleSave() {
  if (saveTimer === null) saveTimer = setTimeout(save, SAVE_INTERVAL_MS);
}

function show(text) {
  term.write(text);
  view.shown += text;
  if (view.shown.length > SHOWN_LIMIT * 1.25) {
    const cut = view.shown.indexOf("\n", view.shown.length - SHOWN_LIMIT);
    view.shown = view.shown.slice(cut < 0 ? view.shown.length - SHOWN_LIMIT : cut + 1);
  }
  scheduleSave();
}

function note(text) {
  show(`\r\n\x1b[2m[${text}]\x1b[0m\r\n`);
}

function updateBar() {
  const title = $("terminal-title");
  const typing = $("typing");
  if (!view) {
    title.textContent = "No session open: pick one on the left, or start a new shell.";
    typing.checked = false;
    typing.disabled = true;
  } else {
    title.textContent = `${view.id}  ${view.command}`;
    typing.checked = view.mode === "write";
    typing.disabled = view.ended;
  }
  $("typing-label").classList.toggle("on", typing.checked);
  markCurrentRow();
}

/** Show session `id`: a fresh terminal, its whole retained output, then live output. */
function openSession(id, fields) {
  closeConnection();
  view = newView(id, fields);
  term.reset();
  term.options.convertEol = !view.pty; // a pipe's "\n" is a new line; a PTY's is not
  save();
  updateBar();
  connect();
  term.focus();
}

function startShell() {
  const id = randomId();
  const create = { type: "execute", command_id: id, ...NEW_SHELL };
  openSession(id, { command: NEW_SHELL.command, pty: true, mode: "write", create });
}

/** Put back the view saved before a reload: its text, then resume from its offsets. */
function restoreView() {
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(VIEW_KEY) || "null");
  } catch (error) {
    saved = null;
  }
  if (!saved || typeof saved.id !== "string") return;
  view = saved;
  term.reset();
  term.options.convertEol = !view.pty;
  if (view.shown) {
    // The terminal answers queries found in old output (e.g. cursor position); those
    // answers are not typing and must not reach the command again.
    suppressInput = true;
    term.write(view.shown, () => { suppressInput = false; });
  }
  updateBar();
  term.focus();
  if (!view.ended) connect();
}

// ---- the socket -----------------------------------------------------------------------

function socketUrl() {
  const url = new URL("execute/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  url.search = "";
  return url.href;
}

function bindingFrame() {
  if (!view.started && view.create) {
    // get-or-create by command_id; the window size comes along (a sandboxd extension)
    return { ...view.create, cols: term.cols, rows: term.rows };
  }
  const frame = {
    type: "reconnect",
    command_id: view.id,
    stdout_offset: view.offsets.stdout,
    stderr_offset: view.offsets.stderr,
  };
  if (view.mode === "watch") frame.watch = true;
  return frame;
}

function send(frame) {
  if (conn && conn.started && conn.ws.readyState === WebSocket.OPEN) {
    conn.ws.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

/** Keys typed while a socket is still attaching wait for it (a few KB at most); they are
 * dropped if that socket fails, never replayed into a later one. */
const PENDING_INPUT_LIMIT = 4096;
function sendInput(data) {
  if (send({ type: "input", data })) return;
  if (conn && !conn.started && conn.pending.length + data.length <= PENDING_INPUT_LIMIT) {
    conn.pending += data;
  }
}

/** Open a socket for the view. `previous` (a mode switch) is closed once this one is
 * attached, so a command with kill_on_disconnect never sees zero clients in between. */
function connect(previous = null) {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  const protocols = [SUBPROTOCOL];
  if (token) protocols.push(TOKEN_SUBPROTOCOL + base64url(token));
  let ws;
  try {
    ws = new WebSocket(socketUrl(), protocols);
  } catch (error) {
    setStatus(`cannot open the socket: ${error.message}`, true);
    return;
  }
  const mine = { ws, opened: false, started: false, exited: false, error: null, previous, pending: "" };
  conn = mine;
  stats.connects++;
  setStatus(attempt ? `reconnecting (attempt ${attempt + 1})…` : "connecting…");
  ws.onopen = () => {
    mine.opened = true;
    ws.send(JSON.stringify(bindingFrame()));
  };
  ws.onmessage = (event) => {
    if (conn !== mine) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    receive(mine, frame);
  };
  ws.onclose = (event) => {
    if (conn !== mine) return;
    closed(mine, event);
  };
}

function receive(mine, frame) {
  switch (frame.type) {
    case "started":
      mine.started = true;
      view.started = true;
      attempt = 0;
      if (mine.previous) {
        mine.previous.ws.close(1000);
        mine.previous = null;
      }
      setStatus(view.mode === "write" ? `attached, typing on (pid ${frame.pid})` : `watching, read-only (pid ${frame.pid})`);
      if (view.mode === "write") {
        sendSize();
        if (mine.pending) send({ type: "input", data: mine.pending });
      }
      mine.pending = "";
      scheduleSave();
      break;
    case "stdout":
    case "stderr":
      output(frame.type, frame.data, frame.offset || 0);
      break;
    case "gap":
      stats.gaps++;
      note(`sandboxd: ${frame.to - frame.from} bytes of ${frame.stream} were dropped before this page read them`);
      view.offsets[frame.stream] = Math.max(view.offsets[frame.stream], frame.to);
      break;
    case "exit":
      mine.exited = true;
      note(`exited ${frame.exit_code}${frame.signal ? ` (${frame.signal})` : ""}`);
      finish(`exited ${frame.exit_code}`);
      break;
    case "error":
      // Terminal when the daemon closes right after it; a refused frame on a read-only
      // attachment leaves the socket open.
      mine.error = frame;
      stats.refusals.push(frame);
      setStatus(`sandboxd: ${frame.error_type}: ${frame.error}`, true);
      break;
    default:
      break; // unknown types are safe to ignore
  }
}

function output(stream, data, offset) {
  const have = view.offsets[stream];
  const length = utf8len(data);
  if (offset > have) {
    stats.gaps++;
    note(`sandboxd: ${offset - have} bytes of ${stream} were no longer retained`);
  } else if (offset < have) {
    // The daemon never resends what a reconnect skipped; count it if it ever does.
    stats.overlaps++;
    if (offset + length <= have) return;
    data = dropUtf8(data, have - offset);
  }
  view.offsets[stream] = offset + length;
  show(data);
}

function finish(text) {
  view.ended = true;
  conn = null;
  save();
  updateBar();
  setStatus(text);
  refreshSessions();
}

async function closed(mine, event) {
  conn = null;
  if (mine.previous) mine.previous.ws.close(1000);
  if (mine.exited) return;
  if (mine.error && (event.code === 1000 || event.code === 1005)) {
    note(`${mine.error.error_type}: ${mine.error.error}`);
    finish(`${mine.error.error_type}: ${mine.error.error}`);
    return;
  }
  if (!mine.opened) {
    // The upgrade was refused; a browser is not told why, so ask over HTTP.
    try {
      await api("sessions");
      setStatus("the terminal socket was refused: is this page's Origin allowed (--allowed-origins)?", true);
    } catch (error) {
      if (error instanceof AuthError) {
        showLogin(error.message);
        return; // retried once a token is entered
      }
      setStatus(error.message, true);
    }
  }
  const delay = event.code === 1001 ? 0 : BACKOFF_S[Math.min(attempt, BACKOFF_S.length - 1)];
  attempt++;
  if (mine.opened) setStatus(`connection lost (${event.code}); reconnecting in ${delay} s…`, true);
  reconnectTimer = setTimeout(() => { if (view && !view.ended && conn === null) connect(); }, delay * 1000);
}

function closeConnection() {
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  attempt = 0;
  if (conn) {
    const old = conn;
    conn = null;
    old.ws.close(1000);
    if (old.previous) old.previous.ws.close(1000);
  }
}

/** Typing on or off: attach again from the offsets shown, with or without `watch`. */
function setMode(mode) {
  if (!view || view.ended || view.mode === mode) return;
  view.mode = mode;
  save();
  updateBar();
  const previous = conn;
  conn = null; // from here on, the old socket's frames are ignored
  clearTimeout(reconnectTimer);
  attempt = 0;
  connect(previous);
  if (mode === "write") term.focus();
}

let resizeTimer = null;
function sendSize() {
  if (view && view.mode === "write" && view.pty) send({ type: "resize", cols: term.cols, rows: term.rows });
}

term.onResize(() => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(sendSize, RESIZE_DEBOUNCE_MS);
});

term.onData((data) => {
  if (suppressInput || !view || view.ended) return;
  if (view.mode !== "write") {
    setStatus("read-only: turn typing on to send input");
    return;
  }
  sendInput(data);
});

term.attachCustomKeyEventHandler((event) => {
  if (event.type !== "keydown" || !event.ctrlKey || !event.shiftKey) return true;
  if (event.code === "KeyF") {
    $("search").focus();
    return false;
  }
  if (event.code === "KeyC" && term.hasSelection() && navigator.clipboard) {
    navigator.clipboard.writeText(term.getSelection()).catch(() => {});
    return false;
  }
  return true;
});

// ---- the session list -----------------------------------------------------------------

let sessions = [];

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text; // text only: a command is whatever someone typed
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function renderSessions() {
  const body = $("sessions").tBodies[0];
  const rows = [];
  for (const s of sessions) {
    const row = document.createElement("tr");
    row.dataset.id = s.command_id;
    row.title = `${s.command_id}: click to watch (read-only)`;
    const state = s.state === "finished" && s.reason ? s.reason : s.state;
    cell(row, state, `state-${s.state}`);
    cell(row, s.command, "command").title = s.command;
    cell(row, String(s.pid));
    const watchers = s.watchers || 0;
    cell(row, watchers ? `${s.clients} + ${watchers} watching` : String(s.clients));
    cell(row, s.exit_code === null || s.exit_code === undefined ? "" : String(s.exit_code));
    row.addEventListener("click", () => {
      if (!view || view.id !== s.command_id) openSession(s.command_id, { command: s.command, pty: s.pty, mode: "watch" });
    });
    rows.push(row);
  }
  body.replaceChildren(...rows);
  $("sessions-empty").hidden = sessions.length > 0;
  markCurrentRow();
}

function markCurrentRow() {
  for (const row of $("sessions").tBodies[0].rows) row.classList.toggle("current", !!view && row.dataset.id === view.id);
}

let listTimer = null;
async function refreshSessions() {
  clearTimeout(listTimer);
  try {
    const answer = await api("sessions");
    sessions = answer.sessions.slice().sort((a, b) => (b.started_at || 0) - (a.started_at || 0));
    renderSessions();
    if (!$("main").hidden && !conn && (!view || view.ended) && !$("status").classList.contains("bad")) {
      setStatus(`${sessions.length} session${sessions.length === 1 ? "" : "s"}`);
    }
  } catch (error) {
    if (error instanceof AuthError) {
      showLogin(error.message);
      return; // no more polling until a token is entered
    }
    setStatus(error.message, true);
  }
  listTimer = setTimeout(refreshSessions, LIST_INTERVAL_MS);
}

// ---- start ------------------------------------------------------------------------------

async function loggedIn() {
  $("login").hidden = true;
  $("main").hidden = false;
  fit.fit();
  if (view && !view.ended && !conn) connect();
  else if (!view) restoreView();
}

async function boot() {
  takeTokenFromFragment();
  term.open($("terminal"));
  await tryWebgl();
  fit.fit();
  new ResizeObserver(() => fit.fit()).observe($("terminal"));
  $("new-shell").addEventListener("click", startShell);
  $("typing").addEventListener("change", (event) => setMode(event.target.checked ? "write" : "watch"));
  $("search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      if (event.shiftKey) search.findPrevious($("search").value);
      else search.findNext($("search").value);
    } else if (event.key === "Escape") {
      term.focus();
    }
  });
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    token = $("login-token").value;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      await api("sessions");
    } catch (error) {
      if (error instanceof AuthError) {
        showLogin(error.message);
        return;
      }
    }
    await loggedIn();
    refreshSessions();
  });
  addEventListener("pagehide", save);
  document.addEventListener("visibilitychange", () => { if (document.hidden) save(); });
  try {
    await api("sessions");
  } catch (error) {
    if (error instanceof AuthError) {
      showLogin(error.message);
      exposeForTests();
      return;
    }
  }
  await loggedIn();
  refreshSessions();
  exposeForTests();
}

function exposeForTests() {
  // As ttyd exposes window.term: the page's state, for browser tests and curious operators.
  window.__sandboxd = {
    term,
    ws: () => (conn ? conn.ws : null),
    attached: () => !!(conn && conn.started && conn.ws.readyState === WebSocket.OPEN),
    view: () => view,
    offsets: () => (view ? { ...view.offsets } : null),
    text: screenText,
    renderer: () => renderer,
    stats,
    ready: true,
  };
}

boot();
