// One xterm.js terminal bound to one session over /execute/ws (protocol.md section 2).
//
// Output is kept exactly once: the viewer counts, per stream, the byte offset up to which
// it has written output to the terminal, and every (re)attachment is a `reconnect` from
// those offsets. The offsets and the text they cover are kept in sessionStorage, so a
// reload puts the same text back and resumes from the same offsets. Attached sessions are
// read-only (`reconnect` with `watch: true`, which the daemon enforces) until typing is on.

import { AuthError, api, dropUtf8, randomId, socketProtocols, utf8len } from "./api.js";

const VIEW_KEY = "sandboxd.view";
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


/** The viewer of `term`. `hooks`: status(text, bad), authProblem(message), changed()
 * (the session or its mode changed), ended() (the session ended). */
export function createViewer(term, hooks) {
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

  /** Show session `id`: a fresh terminal, its whole retained output, then live output. */
  function openSession(id, fields) {
    closeConnection();
    view = newView(id, fields);
    term.reset();
    term.options.convertEol = !view.pty; // a pipe's "\n" is a new line; a PTY's is not
    save();
    hooks.changed();
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
    hooks.changed();
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
    const protocols = socketProtocols();
    let ws;
    try {
      ws = new WebSocket(socketUrl(), protocols);
    } catch (error) {
      hooks.status(`cannot open the socket: ${error.message}`, true);
      return;
    }
    const mine = { ws, opened: false, started: false, exited: false, error: null, previous, pending: "" };
    conn = mine;
    stats.connects++;
    hooks.status(attempt ? `reconnecting (attempt ${attempt + 1})…` : "connecting…");
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
        hooks.status(view.mode === "write" ? `attached, typing on (pid ${frame.pid})` : `watching, read-only (pid ${frame.pid})`);
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
        hooks.status(`sandboxd: ${frame.error_type}: ${frame.error}`, true);
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
    hooks.changed();
    hooks.status(text);
    hooks.ended();
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
        hooks.status("the terminal socket was refused: is this page's Origin allowed (--allowed-origins)?", true);
      } catch (error) {
        if (error instanceof AuthError) {
          hooks.authProblem(error.message);
          return; // retried once a token is entered
        }
        hooks.status(error.message, true);
      }
    }
    const delay = event.code === 1001 ? 0 : BACKOFF_S[Math.min(attempt, BACKOFF_S.length - 1)];
    attempt++;
    if (mine.opened) hooks.status(`connection lost (${event.code}); reconnecting in ${delay} s…`, true);
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
    hooks.changed();
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
      hooks.status("read-only: turn typing on to send input");
      return;
    }
    sendInput(data);
  });

  return {
    openSession,
    startShell,
    restoreView,
    setMode,
    save,
    resume: () => { if (view && !view.ended && !conn) connect(); },
    view: () => view,
    ws: () => (conn ? conn.ws : null),
    attached: () => !!(conn && conn.started && conn.ws.readyState === WebSocket.OPEN),
    stats,
  };
}
