// The browser terminal of sandboxd: the session list (GET /sessions) beside one xterm.js
// terminal (viewer.js), and the token prompt. No inline script, no eval, no innerHTML:
// everything that comes from the daemon is set as text.

import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";
import { WebLinksAddon } from "./vendor/addon-web-links.mjs";
import { SearchAddon } from "./vendor/addon-search.mjs";
import { AuthError, api, openSafely, setToken, takeTokenFromFragment } from "./api.js";
import { createViewer } from "./viewer.js";

const LIST_INTERVAL_MS = 2000;
const $ = (id) => document.getElementById(id);

function setStatus(text, bad = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
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

const viewer = createViewer(term, {
  status: setStatus,
  authProblem: showLogin,
  changed: updateBar,
  ended: refreshSessions,
});

function updateBar() {
  const view = viewer.view();
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
      const view = viewer.view();
      if (!view || view.id !== s.command_id) viewer.openSession(s.command_id, { command: s.command, pty: s.pty, mode: "watch" });
    });
    rows.push(row);
  }
  body.replaceChildren(...rows);
  $("sessions-empty").hidden = sessions.length > 0;
  markCurrentRow();
}

function markCurrentRow() {
  const view = viewer.view();
  for (const row of $("sessions").tBodies[0].rows) row.classList.toggle("current", !!view && row.dataset.id === view.id);
}

let listTimer = null;
async function refreshSessions() {
  clearTimeout(listTimer);
  try {
    const answer = await api("sessions");
    sessions = answer.sessions.slice().sort((a, b) => (b.started_at || 0) - (a.started_at || 0));
    renderSessions();
    const view = viewer.view();
    if (!$("main").hidden && !viewer.ws() && (!view || view.ended) && !$("status").classList.contains("bad")) {
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
  if (viewer.view()) viewer.resume();
  else viewer.restoreView();
}

async function boot() {
  takeTokenFromFragment();
  term.open($("terminal"));
  await tryWebgl();
  fit.fit();
  new ResizeObserver(() => fit.fit()).observe($("terminal"));
  $("new-shell").addEventListener("click", () => viewer.startShell());
  $("typing").addEventListener("change", (event) => viewer.setMode(event.target.checked ? "write" : "watch"));
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
    setToken($("login-token").value);
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
  addEventListener("pagehide", () => viewer.save());
  document.addEventListener("visibilitychange", () => { if (document.hidden) viewer.save(); });
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
    ws: viewer.ws,
    attached: viewer.attached,
    view: viewer.view,
    offsets: () => (viewer.view() ? { ...viewer.view().offsets } : null),
    text: screenText,
    renderer: () => renderer,
    stats: viewer.stats,
    ready: true,
  };
}

boot();
