/* pyoco-es dashboard: the run view's task output pane (live logs).
 *
 * Follows GET /runs/{id}/logs/stream (SSE: `logs` frames, id = position of the frame's last line,
 * resumed with Last-Event-ID by app.js's EventStream; `end` once the run ended and its output is
 * read).  One pane per open run, kept across the run view's re-renders: a task selector ("All"
 * or one task), a search box (filters the lines shown), a download of the lines held here.
 *
 * Safety rule (as app.js): task output only reaches the page through textContent (h() makes
 * text nodes), and control/bidi characters are shown escaped (\x1b), never interpreted.
 */
"use strict";

(() => {
  const KEEP_LINES = 20000; // lines held in memory per run (the oldest go first)
  const SHOW_LINES = 2000; // lines in the DOM at most
  // C0 controls but tab, DEL, C1 controls, and the characters that reorder or hide text.
  const UNSAFE = /[\x00-\x08\x0a-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]/g;

  const escapeControls = (s) =>
    String(s ?? "").replace(UNSAFE, (c) => {
      const code = c.charCodeAt(0);
      return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
    });

  let pane = null; // the open run's pane state

  function fmtTime(ts) {
    if (typeof ts !== "number") return "";
    const d = new Date(ts * 1000);
    return d.toTimeString().slice(0, 8) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function matches(p, line) {
    if (line.stream === "dropped") return true;
    if (p.task !== null && line.task !== p.task) return false;
    if (p.query && !String(line.text).toLowerCase().includes(p.query)) return false;
    return true;
  }

  function lineEl(p, line) {
    const { h } = p.ui;
    const label = (line.task || "-") + (line.stream && line.stream !== "stdout" ? " " + line.stream : "");
    return h("div", { class: "log-line", dataset: { stream: String(line.stream || "stdout"), pos: String(line.pos ?? "") } },
      h("span", { class: "log-time muted" }, fmtTime(line.ts)),
      h("span", { class: "log-task" }, escapeControls(label)),
      h("span", { class: "log-text" }, escapeControls(line.text)));
  }

  function renderLines(p) {
    const body = p.body;
    p.ui.clear(body);
    const shown = p.lines.filter((l) => matches(p, l)).slice(-SHOW_LINES);
    for (const line of shown) body.appendChild(lineEl(p, line));
    p.empty.hidden = shown.length > 0;
    body.scrollTop = body.scrollHeight;
  }

  function addLines(p, lines) {
    const body = p.body;
    const atBottom = body.scrollHeight - body.scrollTop - body.clientHeight < 24;
    for (const line of lines) {
      if (!line || typeof line !== "object") continue;
      p.lines.push(line);
      if (line.task && !p.tasks.includes(line.task)) {
        p.tasks.push(line.task);
        renderTasks(p);
      }
      if (matches(p, line)) {
        body.appendChild(lineEl(p, line));
        p.empty.hidden = true;
      }
    }
    if (p.lines.length > KEEP_LINES) p.lines.splice(0, p.lines.length - KEEP_LINES);
    while (body.childElementCount > SHOW_LINES) body.removeChild(body.firstChild);
    if (atBottom) body.scrollTop = body.scrollHeight;
  }

  function renderTasks(p) {
    const { h, clear, t } = p.ui;
    clear(p.tabs);
    const names = [null, ...p.tasks];
    for (const name of names) {
      p.tabs.appendChild(h("button", {
        type: "button",
        class: "chip log-tab" + (p.task === name ? " active" : ""),
        "aria-pressed": p.task === name ? "true" : "false",
        dataset: { task: name === null ? "" : name },
        onclick: () => { p.task = name; renderTasks(p); renderLines(p); },
      }, name === null ? t("logs.all") : escapeControls(name)));
    }
  }

  function download(p) {
    const text = p.lines.filter((l) => p.task === null || l.task === p.task || l.stream === "dropped")
      .map((l) => new Date((l.ts || 0) * 1000).toISOString() + " [" + (l.task || "-") + " " + (l.stream || "stdout") + "] " + String(l.text ?? "") + "\n")
      .join("");
    const url = URL.createObjectURL(new Blob([text], { type: "text/plain;charset=utf-8" }));
    const a = p.ui.h("a", { href: url, download: "run-" + p.runId + (p.task ? "-" + p.task : "") + "-logs.txt" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  function setState(p, state) {
    p.state = state;
    p.stateEl.dataset.state = state;
    p.stateEl.textContent = p.ui.t("logs.state_" + state);
  }

  function open(run, ui) {
    const { h, t, EventStream } = ui;
    const runId = run.run_id;
    const p = { runId, ui, lines: [], tasks: [], task: null, query: "", state: "connecting", ended: false };
    p.tabs = h("div", { class: "log-tabs", role: "group" });
    p.search = h("input", { type: "search", class: "log-search", id: "logs-search", autocomplete: "off", spellcheck: "false" });
    p.search.addEventListener("input", () => { p.query = p.search.value.trim().toLowerCase(); renderLines(p); });
    p.downloadBtn = h("button", { type: "button", class: "btn btn-ghost btn-small", id: "logs-download", onclick: () => download(p) });
    p.stateEl = h("span", { class: "log-state muted", id: "logs-state" });
    p.title = h("h2", null);
    p.body = h("div", { class: "log-body mono", id: "logs-body", role: "log", "aria-live": "off", tabindex: "0" });
    p.empty = h("p", { class: "muted", id: "logs-empty" });
    p.el = h("section", { class: "card logs-card", id: "logs-card" },
      h("div", { class: "logs-head" }, p.title, p.stateEl, p.tabs, p.search, p.downloadBtn), p.body, p.empty);
    p.stream = new EventStream(() => "/runs/" + encodeURIComponent(runId) + "/logs/stream?timeout_sec=600", {
      idleTimeoutMs: 45000,
      shouldReconnect: () => pane === p && !p.ended,
      onState(state) { if (pane === p && !p.ended) setState(p, state === "live" ? "live" : "connecting"); },
      onEvent(event, data) {
        if (pane !== p) return;
        if (event === "logs" && data && Array.isArray(data.lines)) addLines(p, data.lines);
        else if (event === "end") { p.ended = true; setState(p, "ended"); }
      },
    });
    setState(p, "connecting");
    p.stream.start();
    return p;
  }

  function relabel(p, run) {
    const t = p.ui.t;
    p.title.textContent = t("logs.title");
    p.search.placeholder = t("logs.search");
    p.search.setAttribute("aria-label", t("logs.search"));
    p.downloadBtn.textContent = t("logs.download");
    p.empty.textContent = t("logs.empty");
    setState(p, p.state);
    const known = run.tasks && typeof run.tasks === "object" ? Object.keys(run.tasks) : [];
    let changed = false;
    for (const name of known) if (!p.tasks.includes(name)) { p.tasks.push(name); changed = true; }
    if (changed || !p.tabs.childElementCount) renderTasks(p);
  }

  window.PYOCO_LOGS = {
    /** The open run's output pane: the same element across re-renders of the run view, which
     * places it after (not inside) the re-rendered part, so scroll and focus are kept. */
    pane(run, ui) {
      if (!pane || pane.runId !== run.run_id) {
        this.close();
        pane = open(run, ui);
      }
      pane.ui = ui;
      relabel(pane, run);
      return pane.el;
    },
    close() {
      if (pane) {
        pane.stream.stop();
        pane.el.remove();
      }
      pane = null;
    },
    escapeControls,
  };
})();
