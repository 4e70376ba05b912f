/* pyoco-es dashboard. Vanilla JS, no build step, no network access beyond this server.
 *
 * Safety rule: text that comes from the server (run ids, flow names, tags, params, errors, worker
 * names...) only ever reaches the page through textContent / createTextNode / setAttribute on
 * inert attributes. Nothing here assigns innerHTML.
 *
 * Live data:
 *   - the run list follows GET /runs/stream (SSE, `event: run` frames, resumed with Last-Event-ID);
 *     pages come from GET /runs in delta mode (keyset cursor), so no run is skipped while paging;
 *   - the open run follows GET /runs/{id}/watch (SSE, id = run version) and re-reads
 *     GET /runs/{id}/events when the version moves;
 *   - workers and metrics have no stream: they are polled (3 s and 5 s) while visible.
 * SSE is read with fetch() so the API-key header can be sent.
 */
"use strict";

(() => {
  const STRINGS = window.PYOCO_I18N || { en: {} };
  const LS = {
    lang: "pyoco.lang",
    authHeader: "pyoco.auth_header",
    authKey: "pyoco.auth_key",
    showHidden: "pyoco.workers.show_hidden",
    sort: "pyoco.runs.sort",
  };
  const RUN_STATUSES = ["PENDING", "RUNNING", "CANCELLING", "COMPLETED", "FAILED", "CANCELLED"];
  const ACTIVE = new Set(["PENDING", "PENDING_APPROVAL", "RUNNING", "CANCELLING"]);
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
  const WORKER_STATES = ["RUNNING", "IDLE", "STOPPED_GRACEFUL", "DISCONNECTED"];
  const PAGE_SIZE = 50;
  const RENDER_STEP = 200; // rows drawn at a time; "Show more" draws the next batch
  const KEEP_RUNS = 3000; // runs held in memory; beyond TRIM_AT the oldest are dropped
  const TRIM_AT = 3600;

  // ---------------------------------------------------------------------------------------------
  // small helpers

  const $ = (id) => document.getElementById(id);
  const WSYNC = window.PyocoWheelSync || null; // wheelsync.js: wheel sync rows, a run's code
  // Pages kept in their own files (static/wheels.js ...) register here before setup runs:
  // {name, tab, title, init(ui), show(), hide(), render()}; see setupPages().
  const pages = {};

  function store(key, value) {
    try {
      if (value === null || value === undefined || value === "") localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch (_) { /* private mode: keep going without persistence */ }
  }
  function load(key, fallback) {
    try {
      const v = localStorage.getItem(key);
      return v === null ? fallback : v;
    } catch (_) {
      return fallback;
    }
  }

  /** createElement with props; string children become text nodes (never parsed as HTML). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = String(v);
        else if (k === "dataset") Object.assign(el.dataset, v);
        else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? "" : String(v));
      }
    }
    appendAll(el, children);
    return el;
  }
  function appendAll(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) appendAll(el, c);
      else if (c instanceof Node) el.appendChild(c);
      else el.appendChild(document.createTextNode(String(c)));
    }
  }
  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const runHref = (id) => "#/runs/" + encodeURIComponent(id);
  const shortId = (id) => (typeof id === "string" && id.length > 13 ? id.slice(0, 8) : String(id ?? ""));
  const asText = (v) => (v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));

  function prettyJson(v) {
    try {
      return JSON.stringify(v, null, 2);
    } catch (_) {
      return String(v);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // i18n

  const serverLang = (() => {
    const v = document.documentElement.getAttribute("data-server-lang") || "";
    if (v === "ja" || v === "en") return v;
    return (navigator.language || "en").toLowerCase().startsWith("ja") ? "ja" : "en";
  })();
  let lang = (() => {
    const saved = load(LS.lang, "");
    return saved === "ja" || saved === "en" ? saved : serverLang;
  })();

  function t(key, vars) {
    const table = STRINGS[lang] || {};
    let s = key in table ? table[key] : key in STRINGS.en ? STRINGS.en[key] : key;
    if (vars) s = s.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? asText(vars[name]) : m));
    return s;
  }
  /** The translation of key, or fallback when no language has it (unknown states from data). */
  function tOr(key, fallback) {
    return key in (STRINGS[lang] || {}) || key in STRINGS.en ? t(key) : String(fallback);
  }
  const statusLabel = (s) => tOr("status." + (s || "UNKNOWN"), s);
  /** A run's ending reason (run.failed / run.cancelled: forced, worker_lost ...) in words; an
   * unknown one as it came. */
  const reasonLabel = (r) => (r === null || r === undefined || r === "" ? "" : tOr("reason." + r, r));

  function applyStaticI18n() {
    document.documentElement.lang = lang;
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]"))
      el.setAttribute("placeholder", t(el.dataset.i18nPlaceholder));
    for (const el of document.querySelectorAll("[data-i18n-title]")) el.setAttribute("title", t(el.dataset.i18nTitle));
    for (const el of document.querySelectorAll("[data-i18n-aria-label]"))
      el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
    for (const b of document.querySelectorAll("#lang-switch button")) {
      b.setAttribute("aria-pressed", String(b.dataset.lang === lang));
    }
    setTitle();
  }

  function setTitle() {
    let title = t("app.title") + " · " + t(pages[route.view] ? pages[route.view].title : extViews[route.view] ? "nav." + route.view : route.view === "workers" ? "nav.workers" : "nav.runs");
    if (route.view === "run" && detail.run) title = statusLabel(detail.run.status) + " · " + (detail.run.flow_name || "") + " · " + t("app.title");
    if (document.title !== title) document.title = title;
  }

  function setLang(next) {
    if (next !== "en" && next !== "ja") return;
    lang = next;
    store(LS.lang, next);
    applyStaticI18n();
    fillStatusSelect();
    renderAll();
  }

  // ---------------------------------------------------------------------------------------------
  // time formatting

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return t("common.none");
    if (seconds < 0.001) return "<1 ms";
    if (seconds < 1) return Math.round(seconds * 1000) + " ms";
    if (seconds < 60) return (seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)) + " s";
    const m = Math.floor(seconds / 60);
    const s = Math.floor(seconds % 60);
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    const hh = Math.floor(m / 60);
    return hh + "h " + String(m % 60).padStart(2, "0") + "m";
  }
  function fmtRelative(ts) {
    if (!ts) return t("time.never");
    const diff = ts - Date.now() / 1000;
    const abs = Math.abs(diff);
    if (abs < 2) return t("time.now");
    const rtf = new Intl.RelativeTimeFormat(lang, { numeric: "auto", style: "narrow" });
    if (abs < 60) return rtf.format(Math.round(diff), "second");
    if (abs < 3600) return rtf.format(Math.round(diff / 60), "minute");
    if (abs < 86400) return rtf.format(Math.round(diff / 3600), "hour");
    return rtf.format(Math.round(diff / 86400), "day");
  }
  function fmtAbsolute(ts, withMs) {
    if (!ts) return t("common.none");
    const d = new Date(ts * 1000);
    const same = new Date().toDateString() === d.toDateString();
    const opts = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
    if (!same) Object.assign(opts, { year: "numeric", month: "2-digit", day: "2-digit" });
    if (withMs) opts.fractionalSecondDigits = 3;
    return new Intl.DateTimeFormat(lang === "ja" ? "ja-JP" : "en-GB", opts).format(d);
  }
  /** A <time> element that keeps itself up to date (see tick()). */
  function relTime(ts) {
    const el = h("time", { class: "rel", dataset: { ts: ts ? String(ts) : "" } }, fmtRelative(ts));
    if (ts) {
      el.setAttribute("datetime", new Date(ts * 1000).toISOString());
      el.title = fmtAbsolute(ts, true);
    }
    return el;
  }
  function runDuration(run) {
    const start = run.start_time;
    if (!start) return null;
    const end = run.end_time || (TERMINAL.has(run.status) ? run.updated_at : null);
    return (end || Date.now() / 1000) - start;
  }
  /** A duration that ticks while the run is active. */
  function durationEl(run) {
    const el = h("span", { class: "dur num" }, fmtDuration(runDuration(run)));
    if (run.start_time && !run.end_time && !TERMINAL.has(run.status)) el.dataset.start = String(run.start_time);
    return el;
  }
  function tick() {
    for (const el of document.querySelectorAll("time.rel[data-ts]")) {
      const ts = parseFloat(el.dataset.ts);
      el.textContent = fmtRelative(isFinite(ts) ? ts : null);
    }
    for (const el of document.querySelectorAll(".dur[data-start]")) {
      el.textContent = fmtDuration(Date.now() / 1000 - parseFloat(el.dataset.start));
    }
  }

  // ---------------------------------------------------------------------------------------------
  // HTTP

  function authHeaders() {
    const key = load(LS.authKey, "");
    const name = load(LS.authHeader, "X-API-Key") || "X-API-Key";
    return key ? { [name]: key } : {};
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(status ? status + " " + asText(detail) : asText(detail));
      this.status = status;
      this.detail = detail;
    }
    describe() {
      if (!this.status) return t("err.network");
      if ([401, 403, 404, 503].includes(this.status)) return t("err." + this.status);
      return t("err.generic", { status: this.status, detail: asText(this.detail) });
    }
  }

  async function api(path, { method = "GET", json, signal } = {}) {
    const headers = { Accept: "application/json", ...authHeaders() };
    const init = { method, headers, signal, cache: "no-store" };
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      throw new ApiError(0, String(e));
    }
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        detail = body && body.detail !== undefined ? body.detail : body;
      } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, detail);
    }
    const ct = res.headers.get("content-type") || "";
    return ct.includes("json") ? res.json() : res.text();
  }

  let lastOk = null;
  function noteOk() {
    lastOk = Date.now() / 1000;
    const footer = $("footer-updated");
    footer.textContent = t("footer.updated", { time: fmtAbsolute(lastOk) });
    $("footer-error").textContent = "";
  }
  function noteError(err) {
    if (err && err.name === "AbortError") return;
    const msg = err instanceof ApiError ? err.describe() : String(err);
    if (err instanceof ApiError && (err.status === 401 || err.status === 403) && window.pyocoAuthState) window.pyocoAuthState.check();
    $("footer-error").textContent = msg;
  }

  // ---------------------------------------------------------------------------------------------
  // SSE over fetch, with Last-Event-ID resume and backoff

  class EventStream {
    /**
     * @param {() => string} url
     * @param {{onEvent: Function, onState: Function, onOpen?: Function, idleTimeoutMs?: number,
     *          shouldReconnect?: () => boolean}} opts
     */
    constructor(url, opts) {
      this.url = url;
      this.opts = opts;
      this.lastEventId = null;
      this.stopped = true;
      this.controller = null;
      this.wake = null;
      this.state = "idle";
    }
    start() {
      if (!this.stopped) return;
      this.stopped = false;
      this.loop();
    }
    stop() {
      this.stopped = true;
      if (this.controller) this.controller.abort();
      if (this.wake) this.wake();
      this.setState("idle");
    }
    /** Drop the current connection and reconnect at once (keeps Last-Event-ID). */
    restart() {
      if (this.stopped) return this.start();
      if (this.controller) this.controller.abort();
      if (this.wake) this.wake();
    }
    setState(state, info) {
      this.state = state;
      this.opts.onState(state, info || {});
    }
    async loop() {
      let backoff = 500;
      while (!this.stopped) {
        const controller = new AbortController();
        this.controller = controller;
        let idleTimer = null;
        const idleMs = this.opts.idleTimeoutMs || 45000;
        const armIdle = () => {
          clearTimeout(idleTimer);
          idleTimer = setTimeout(() => controller.abort(), idleMs);
        };
        let reason = null;
        let openedAt = Date.now();
        try {
          this.setState("connecting");
          const headers = { Accept: "text/event-stream", ...authHeaders() };
          if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
          armIdle();
          const res = await fetch(this.url(), { headers, signal: controller.signal, cache: "no-store" });
          if (!res.ok) {
            let detail = res.statusText;
            try { detail = (await res.json()).detail; } catch (_) { /* ignore */ }
            throw new ApiError(res.status, detail);
          }
          backoff = 500;
          openedAt = Date.now();
          this.setState("live");
          if (this.opts.onOpen) this.opts.onOpen(this.lastEventId);
          const reader = res.body.getReader();
          const decoder = new TextDecoder();
          let buf = "";
          for (;;) {
            armIdle();
            const { value, done } = await reader.read();
            if (done) break;
            buf += decoder.decode(value, { stream: true });
            buf = buf.replace(/\r\n/g, "\n");
            let cut;
            while ((cut = buf.indexOf("\n\n")) >= 0) {
              const block = buf.slice(0, cut);
              buf = buf.slice(cut + 2);
              this.dispatch(block);
            }
          }
        } catch (e) {
          reason = e;
        } finally {
          clearTimeout(idleTimer);
        }
        if (this.stopped) break;
        if (this.opts.shouldReconnect && !this.opts.shouldReconnect()) {
          this.setState("final");
          this.stopped = true;
          break;
        }
        if (!reason && Date.now() - openedAt > 2000) {
          // the server ended a long-lived stream cleanly (its timeout): resume at once, no alarm
          this.setState("connecting");
          await sleep(100);
          continue;
        }
        if (!reason) reason = new ApiError(0, "stream closed");
        if (reason.name !== "AbortError") noteError(reason);
        const wait = reason.name !== "AbortError" ? backoff : Math.min(backoff, 1000);
        const jitter = Math.round(wait * (0.8 + Math.random() * 0.4));
        this.setState("reconnecting", { until: Date.now() + jitter, error: reason });
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, jitter);
          this.wake = () => { clearTimeout(timer); resolve(); };
        });
        this.wake = null;
        backoff = Math.min(backoff * 2, 15000);
      }
    }
    dispatch(block) {
      let event = "message";
      const data = [];
      let id = null;
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
        else if (field === "id" && !value.includes("\0")) id = value;
      }
      if (id !== null) this.lastEventId = id;
      if (!data.length) return;
      let parsed;
      try {
        parsed = JSON.parse(data.join("\n"));
      } catch (_) {
        parsed = data.join("\n");
      }
      try {
        this.opts.onEvent(event, parsed, id);
      } catch (e) {
        console.error("event handler failed", e);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // state

  const route = { view: "runs", runId: null };
  const runs = {
    items: new Map(), // run_id -> summary (only runs matching the server-side filters)
    cursor: null,
    hasMore: false,
    loaded: false,
    loading: false,
    generation: 0, // bumps when filters change; stale responses are dropped
    rows: new Map(), // run_id -> {el, stamp}
    renderLimit: RENDER_STEP,
  };
  const filters = { status: "", flow: "", tag: "", q: "", worker: "" };
  const SORTS = ["updated", "active", "updated_asc", "started", "ended", "flow", "status"];
  let sortMode = SORTS.includes(load(LS.sort, "updated")) ? load(LS.sort, "updated") : "updated";
  const workers = { items: [], loaded: false, stateFilter: "", showHidden: load(LS.showHidden, "0") === "1", busy: new Set() };
  let metrics = null;
  const detail = { id: null, run: null, events: null, eventsError: null, stream: null, watchState: "idle", eventsVersion: null, cancelling: false, eventsTimer: null };

  // ---------------------------------------------------------------------------------------------
  // connection indicator (follows the run-list stream)

  const conn = { state: "connecting", until: 0 };
  function renderConn() {
    const el = $("conn");
    el.dataset.state = conn.state === "live" ? "live" : conn.state === "reconnecting" ? "down" : "connecting";
    let text;
    if (conn.state === "live") text = t("conn.live");
    else if (conn.state === "reconnecting") {
      const s = Math.max(0, Math.ceil((conn.until - Date.now()) / 1000));
      text = t("conn.reconnecting", { s });
    } else text = t("conn.connecting");
    $("conn-text").textContent = text;
    el.title = conn.state === "live" ? t("conn.title_live") : t("conn.title_down") + " · " + t("conn.retry");
  }

  // ---------------------------------------------------------------------------------------------
  // runs: data

  function newer(a, b) {
    // is a at least as fresh as b?
    if (!b) return true;
    const va = typeof a.version === "number" ? a.version : null;
    const vb = typeof b.version === "number" ? b.version : null;
    if (va !== null && vb !== null && va !== vb) return va > vb;
    return (a.updated_at || 0) >= (b.updated_at || 0);
  }
  function matchesServerFilters(run) {
    if (filters.status && run.status !== filters.status) return false;
    if (filters.flow && run.flow_name !== filters.flow) return false;
    if (filters.tag && run.tag !== filters.tag) return false;
    return true;
  }
  function mergeRun(run, { fromStream } = {}) {
    if (!run || typeof run.run_id !== "string") return false;
    const old = runs.items.get(run.run_id);
    if (old && !newer(run, old)) return false;
    const merged = old ? { ...old, ...run } : run;
    if (fromStream && !old && runs.loaded && !matchesServerFilters(merged)) return false;
    runs.items.set(run.run_id, merged);
    return true;
  }
  function listQuery(extra) {
    const p = new URLSearchParams();
    p.set("limit", String(PAGE_SIZE));
    if (filters.status) p.set("status", filters.status);
    if (filters.flow) p.set("flow", filters.flow);
    if (filters.tag) p.set("tag", filters.tag);
    for (const [k, v] of Object.entries(extra)) p.set(k, v);
    return "/runs?" + p.toString();
  }
  function pageItems(body) {
    if (Array.isArray(body)) return { items: body, next: null };
    return { items: (body && body.items) || [], next: (body && body.next_cursor) || null };
  }

  async function loadFirstPage() {
    const gen = ++runs.generation;
    runs.loading = true;
    renderRuns();
    try {
      const body = await api(listQuery({ updated_after: "0" }));
      if (gen !== runs.generation) return;
      const { items, next } = pageItems(body);
      // merge rather than replace: stream frames that arrived while this page was in flight stay
      for (const r of items) mergeRun(r);
      runs.cursor = next;
      runs.hasMore = !!next;
      runs.loaded = true;
      noteOk();
    } catch (e) {
      noteError(e);
    } finally {
      if (gen === runs.generation) {
        runs.loading = false;
        if (runs.catchUpAfterLoad && runs.loaded) {
          runs.catchUpAfterLoad = false;
          catchUp();
        }
      }
      renderRuns();
    }
  }
  async function loadMore() {
    // draw what is already loaded first, then ask the server for older runs
    if (sortedVisibleRuns().length > runs.renderLimit) {
      runs.renderLimit += RENDER_STEP;
      renderRuns();
      return;
    }
    runs.renderLimit += PAGE_SIZE;
    if (!runs.cursor || runs.loading) return;
    const gen = runs.generation;
    runs.loading = true;
    renderRuns();
    try {
      const body = await api(listQuery({ cursor: runs.cursor }));
      if (gen !== runs.generation) return;
      const { items, next } = pageItems(body);
      for (const r of items) mergeRun(r);
      runs.cursor = next;
      runs.hasMore = !!next;
      noteOk();
    } catch (e) {
      noteError(e);
    } finally {
      if (gen === runs.generation) runs.loading = false;
      renderRuns();
    }
  }
  /** After a reconnect: fetch whatever changed since the newest run we know (belt and braces). */
  async function catchUp() {
    if (!runs.loaded) return loadFirstPage();
    let newest = 0;
    for (const r of runs.items.values()) newest = Math.max(newest, r.updated_at || 0);
    const gen = runs.generation;
    let cursor = null;
    try {
      for (let page = 0; page < 20; page++) {
        // a small margin re-reads runs that share the newest timestamp; merging dedups them
        const extra = { updated_after: String(Math.max(0, newest - 0.5)) };
        if (cursor) extra.cursor = cursor;
        const { items, next } = pageItems(await api(listQuery(extra)));
        if (gen !== runs.generation) return;
        for (const r of items) mergeRun(r);
        if (!next) break;
        cursor = next;
      }
      noteOk();
    } catch (e) {
      noteError(e);
    }
    scheduleRenderRuns();
  }

  const runStream = new EventStream(() => "/runs/stream", {
    idleTimeoutMs: 45000,
    onState(state, info) {
      conn.state = state === "live" ? "live" : state === "reconnecting" ? "reconnecting" : "connecting";
      conn.until = info.until || 0;
      renderConn();
      if (state === "reconnecting" && !runs.loaded && !runs.loading) loadFirstPage();
    },
    onOpen() {
      // The stream is open before the list is read, so every change after this point reaches us;
      // on a reconnect the server resumes from Last-Event-ID, and catchUp() covers a server
      // that could not.
      if (runs.loaded) catchUp();
      else if (runs.loading) runs.catchUpAfterLoad = true;
      else loadFirstPage();
    },
    onEvent(event, data) {
      if (event === "run" || event === "message") {
        const run = data && data.run ? data.run : data && data.snapshot ? data.snapshot : data;
        if (mergeRun(run, { fromStream: true })) {
          flashIds.add(run.run_id);
          scheduleRenderRuns();
          scheduleMetrics();
          if (detail.id === run.run_id) maybeRefreshDetailFromSummary(run);
        }
      } else if (event === "reset") {
        loadFirstPage();
      }
    },
  });

  // ---------------------------------------------------------------------------------------------
  // runs: view

  const flashIds = new Set();
  let renderQueued = false;
  function scheduleRenderRuns() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderRuns();
    });
  }

  function sortedVisibleRuns() {
    const q = filters.q.trim().toLowerCase();
    const w = filters.worker.trim().toLowerCase();
    const list = [];
    for (const r of runs.items.values()) {
      if (!matchesServerFilters(r)) continue;
      if (q && !String(r.run_id).toLowerCase().includes(q)) continue;
      if (w && !String(r.worker_id || "").toLowerCase().includes(w)) continue;
      list.push(r);
    }
    const byUpdated = (a, b) => (b.updated_at || 0) - (a.updated_at || 0) || (a.run_id < b.run_id ? 1 : a.run_id > b.run_id ? -1 : 0);
    const newestFirst = (key) => (a, b) => (b[key] || 0) - (a[key] || 0) || byUpdated(a, b);
    const statusRank = (r) => { const i = RUN_STATUSES.indexOf(r.status); return i < 0 ? 99 : i; };
    const cmp = {
      updated: byUpdated,
      updated_asc: (a, b) => -byUpdated(a, b),
      active: (a, b) => ((ACTIVE.has(a.status) ? 0 : a.status === "FAILED" ? 1 : 2) - (ACTIVE.has(b.status) ? 0 : b.status === "FAILED" ? 1 : 2)) || byUpdated(a, b),
      started: newestFirst("start_time"),
      ended: newestFirst("end_time"),
      flow: (a, b) => String(a.flow_name || "").localeCompare(String(b.flow_name || "")) || byUpdated(a, b),
      status: (a, b) => statusRank(a) - statusRank(b) || byUpdated(a, b),
    }[sortMode] || byUpdated;
    list.sort(cmp);
    return list;
  }

  function statusBadge(status, kind) {
    const s = status || "UNKNOWN";
    const label = kind === "task" ? tOr("task." + s, s) : kind === "worker" ? tOr("worker." + s, s) : statusLabel(s);
    return h("span", { class: "badge", dataset: { status: s }, title: label }, h("span", { class: "badge-dot", "aria-hidden": "true" }), h("span", { class: "badge-text" }, label));
  }

  function runRow(run) {
    const worker = run.worker_id || "";
    const tags = Array.isArray(run.tags) ? run.tags.filter((x) => x !== run.tag) : [];
    const row = h(
      "a",
      { class: "run-row", href: runHref(run.run_id), role: "listitem", dataset: { runId: run.run_id, status: run.status || "" } },
      h("span", { class: "c-status" }, statusBadge(run.status),
        typeof run.attempt === "number" && run.attempt > 1 ? h("span", { class: "retry", title: t("detail.attempt") + " " + run.attempt }, "↻" + run.attempt) : null),
      h("span", { class: "c-run mono", title: run.run_id }, shortId(run.run_id), h("span", { class: "c-run-rest" }, String(run.run_id).slice(8))),
      h("span", { class: "c-flow" }, h("strong", null, run.flow_name || "")),
      h("span", { class: "c-tag" }, run.tag ? h("span", { class: "chip" }, run.tag) : null, tags.map((x) => h("span", { class: "chip chip-soft" }, x))),
      h("span", { class: "c-worker mono" }, worker ? worker : h("span", { class: "muted" }, t("common.none"))),
      h("span", { class: "c-updated num" }, relTime(run.updated_at)),
      h("span", { class: "c-duration num" }, durationEl(run)),
      run.error ? h("span", { class: "c-error", title: asText(run.error) }, asText(run.error)) : null,
    );
    return runRowHooks.reduce((el, hook) => hook(el, run) || el, row);
  }

  /** The list cursor for a (updated_at, run_id) key, in the server's format (contract §1.4). */
  function encodeCursor(run) {
    const raw = JSON.stringify({ u: run.updated_at || 0, r: run.run_id });
    const b64 = btoa(String.fromCharCode(...new TextEncoder().encode(raw)));
    return b64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  /**
   * A dashboard left open on a busy system would otherwise grow without bound: keep the newest
   * KEEP_RUNS and move the paging cursor to the oldest one kept, so "Show more" fetches the
   * dropped ones again from the server (nothing becomes unreachable).
   */
  function trimRuns() {
    // never drop what the user paged to on purpose
    const limit = Math.max(KEEP_RUNS, runs.renderLimit);
    if (runs.items.size <= limit + (TRIM_AT - KEEP_RUNS)) return;
    const byNewest = [...runs.items.values()].sort((a, b) => (b.updated_at || 0) - (a.updated_at || 0) || (a.run_id < b.run_id ? 1 : -1));
    const keep = byNewest.slice(0, limit);
    for (const r of byNewest.slice(limit)) runs.items.delete(r.run_id);
    runs.cursor = encodeCursor(keep[keep.length - 1]);
    runs.hasMore = true;
  }

  function renderRuns() {
    if (route.view !== "runs") return;
    trimRuns();
    const list = $("runs-list");
    const all = sortedVisibleRuns();
    const visible = all.slice(0, runs.renderLimit);
    const wanted = new Set();
    let prev = null;
    for (const run of visible) {
      wanted.add(run.run_id);
      const stamp = [run.status, run.version, run.updated_at, run.worker_id, run.start_time, run.end_time, run.error, run.attempt, lang].join("|");
      let entry = runs.rows.get(run.run_id);
      if (!entry || entry.stamp !== stamp) {
        const el = runRow(run);
        if (entry) entry.el.replaceWith(el);
        if (flashIds.has(run.run_id) && runs.loaded) el.classList.add(entry ? "flash" : "arrive");
        entry = { el, stamp };
        runs.rows.set(run.run_id, entry);
      }
      const want = prev ? prev.nextSibling : list.firstChild;
      if (want !== entry.el) list.insertBefore(entry.el, want);
      prev = entry.el;
    }
    flashIds.clear();
    for (const [id, entry] of runs.rows) {
      if (!wanted.has(id)) {
        entry.el.remove();
        runs.rows.delete(id);
      }
    }
    const empty = $("runs-empty");
    const filtered = filters.status || filters.flow || filters.tag || filters.q || filters.worker;
    if (!visible.length) {
      empty.hidden = false;
      empty.textContent = runs.loading && !runs.loaded ? t("runs.loading") : filtered ? t("runs.empty_filtered") : t("runs.empty");
    } else empty.hidden = true;
    const more = $("runs-more");
    more.hidden = !runs.hasMore && all.length <= visible.length;
    more.disabled = runs.loading;
    $("runs-count").textContent = runs.loaded
      ? runs.hasMore || filters.q || filters.worker || all.length > visible.length
        ? t("runs.shown", { shown: visible.length, loaded: runs.items.size })
        : t("runs.all_loaded", { n: runs.items.size })
      : "";
    $("f-clear").hidden = !filtered;
    const active = [filters.status, filters.flow, filters.tag, filters.worker].filter(Boolean).length;
    $("filters-count").textContent = active ? String(active) : "";
  }

  function fillStatusSelect() {
    const sel = $("f-status");
    const current = filters.status;
    clear(sel);
    sel.appendChild(h("option", { value: "" }, t("status.ALL")));
    for (const s of RUN_STATUSES) sel.appendChild(h("option", { value: s }, statusLabel(s)));
    sel.value = current;
  }

  let filterTimer = null;
  function filtersChanged() {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      syncFiltersToHash();
      runs.loaded = false;
      runs.items.clear();
      runs.cursor = null;
      runs.hasMore = false;
      runs.renderLimit = RENDER_STEP;
      loadFirstPage();
    }, 250);
  }
  function syncFiltersToHash() {
    const p = new URLSearchParams();
    if (filters.status) p.set("status", filters.status);
    if (filters.flow) p.set("flow", filters.flow);
    if (filters.tag) p.set("tag", filters.tag);
    if (filters.q) p.set("q", filters.q);
    if (filters.worker) p.set("worker", filters.worker);
    const qs = p.toString();
    const target = "#/runs" + (qs ? "?" + qs : "");
    if (location.hash !== target) history.replaceState(null, "", target);
  }

  async function searchExact(q) {
    const id = q.trim();
    if (!id) return;
    if (runs.items.has(id)) {
      location.hash = runHref(id);
      return;
    }
    const matches = sortedVisibleRuns();
    if (matches.length === 1) {
      // a prefix that names exactly one loaded run is enough
      location.hash = runHref(matches[0].run_id);
      return;
    }
    try {
      const run = await api("/runs/" + encodeURIComponent(id));
      location.hash = runHref(run.run_id);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) toast(t("runs.not_found", { id }), "warn");
      else noteError(e);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // run detail

  function openDetail(id) {
    if (detail.id === id && detail.stream) return;
    closeDetail();
    detail.id = id;
    detail.run = runs.items.get(id) || null;
    detail.events = null;
    detail.eventsError = null;
    detail.eventsVersion = null;
    detail.cancelling = false;
    detail.notFound = false;
    renderDetail();
    fetchDetail(id);
    const stream = new EventStream(() => "/runs/" + encodeURIComponent(id) + "/watch?include=records&timeout_sec=600", {
      idleTimeoutMs: 45000,
      // a finished run never changes again: once the server closes the stream after the final
      // frame there is nothing left to wait for
      shouldReconnect: () => detail.id === id && !(detail.run && TERMINAL.has(detail.run.status)),
      onState(state) {
        if (detail.id !== id) return;
        detail.watchState = state;
        renderWatchBadge();
      },
      onEvent(event, data) {
        if (detail.id !== id) return;
        if (event === "heartbeat") return;
        const snap = data && data.snapshot ? data.snapshot : data && data.run ? data.run : data;
        if (snap && typeof snap === "object" && snap.run_id === id) applyDetailSnapshot(snap);
      },
    });
    detail.stream = stream;
    stream.start();
  }
  function closeDetail() {
    if (window.PYOCO_LOGS) window.PYOCO_LOGS.close();
    if (detail.stream) detail.stream.stop();
    clearTimeout(detail.eventsTimer);
    detail.stream = null;
    detail.id = null;
    detail.run = null;
  }

  async function fetchDetail(id, attempt = 0) {
    try {
      const run = await api("/runs/" + encodeURIComponent(id) + "?include=records");
      if (detail.id !== id) return;
      applyDetailSnapshot(run, true);
      noteOk();
    } catch (e) {
      if (detail.id !== id) return;
      if (e instanceof ApiError && e.status === 404 && attempt < 3) {
        // a run opened right after its submit may not be readable for a moment
        await sleep(400);
        return fetchDetail(id, attempt + 1);
      }
      if (e instanceof ApiError && e.status === 404) {
        detail.notFound = true;
        if (detail.stream) detail.stream.stop();
        renderDetail();
      } else noteError(e);
    }
    scheduleEvents(id, 0);
  }

  function applyDetailSnapshot(snap, force) {
    if (!force && detail.run && !newer(snap, detail.run)) return;
    const before = detail.run;
    detail.run = before ? { ...before, ...snap } : snap;
    if (!snap.task_records && before && before.task_records) detail.run.task_records = before.task_records;
    detail.notFound = false;
    mergeRun(summaryOf(detail.run));
    scheduleRenderRuns();
    renderDetail();
    if (!before || before.version !== detail.run.version || before.status !== detail.run.status || detail.events === null) {
      scheduleEvents(detail.id, 150);
    }
  }
  function maybeRefreshDetailFromSummary(summary) {
    if (detail.run && newer(summary, detail.run) && summary.version !== detail.run.version) {
      // the list stream saw a newer version than the watch; re-read to stay exact
      fetchDetail(detail.id);
    }
  }
  function summaryOf(run) {
    const keys = ["run_id", "schedule_id", "flow_name", "tag", "tags", "tenant_id", "api_key_id", "status", "updated_at",
      "heartbeat_at", "worker_id", "error", "start_time", "end_time", "submitted_at", "version", "attempt"];
    const out = {};
    for (const k of keys) if (k in run) out[k] = run[k];
    return out;
  }

  function scheduleEvents(id, delay) {
    clearTimeout(detail.eventsTimer);
    detail.eventsTimer = setTimeout(() => fetchEvents(id), delay);
  }
  async function fetchEvents(id) {
    try {
      // incremental: only the events after the last one we hold (the history is append-only)
      const have = detail.events && detail.events.length ? detail.events[detail.events.length - 1].seq || 0 : 0;
      const body = await api("/runs/" + encodeURIComponent(id) + "/events" + (have ? "?after_seq=" + have : ""));
      if (detail.id !== id) return;
      const list = Array.isArray(body) ? body : (body && (body.events || body.items)) || [];
      const bySeq = new Map((have ? detail.events : []).map((e) => [e.seq, e]));
      for (const e of list) bySeq.set(e.seq, e);
      detail.events = [...bySeq.values()].sort((a, b) => (a.seq || 0) - (b.seq || 0));
      detail.eventsError = null;
      detail.eventsVersion = detail.run ? detail.run.version : null;
    } catch (e) {
      if (detail.id !== id) return;
      detail.eventsError = e;
    }
    renderTimeline();
  }

  function renderWatchBadge() {
    const el = document.querySelector("#run-detail .watch");
    if (!el) return;
    const st = detail.run && TERMINAL.has(detail.run.status)
      ? "final"
      : detail.watchState === "live" ? "live" : detail.watchState === "reconnecting" ? "reconnecting" : "connecting";
    el.dataset.state = st;
    el.lastChild.textContent = t("detail.watch_" + st);
  }

  function kv(label, value, extraClass) {
    return h("div", { class: "kv" + (extraClass ? " " + extraClass : "") }, h("dt", null, label), h("dd", null, value));
  }
  function timeValue(ts) {
    if (!ts) return h("span", { class: "muted" }, t("common.none"));
    return h("span", null, fmtAbsolute(ts), " ", h("span", { class: "muted" }, "(", relTime(ts), ")"));
  }

  function renderDetail() {
    if (route.view !== "run") return;
    const root = $("run-detail");
    const run = detail.run;
    if (detail.notFound) {
      clear(root).appendChild(h("div", { class: "empty card" }, t("detail.not_found", { id: detail.id })));
      return;
    }
    if (!run) {
      clear(root).appendChild(h("div", { class: "empty card" }, t("detail.loading")));
      return;
    }
    // keep open <details> panels open across re-renders
    const open = new Set([...root.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
    const closed = new Set([...root.querySelectorAll("details:not([open])[data-key]")].map((d) => d.dataset.key));
    const status = run.status || "UNKNOWN";
    const cancellable = ACTIVE.has(status) && status !== "CANCELLING" && !detail.cancelling;
    const cancelBtn = h(
      "button",
      { type: "button", class: "btn btn-danger", id: "cancel-run", disabled: !cancellable, onclick: () => confirmCancel(run.run_id) },
      status === "CANCELLING" || detail.cancelling ? t("detail.cancelling") : t("detail.cancel"),
    );
    if (TERMINAL.has(status)) cancelBtn.hidden = true;

    const copyBtn = h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: (ev) => copyId(ev.currentTarget, run.run_id) }, t("detail.copy"));
    const head = h(
      "div",
      { class: "card detail-head", dataset: { status } },
      h(
        "div",
        { class: "detail-title" },
        h("div", { class: "detail-title-main" },
          h("h1", null, run.flow_name || ""),
          h("div", { class: "detail-id mono" }, h("span", { id: "detail-run-id" }, run.run_id), copyBtn)),
        h("div", { class: "detail-actions" },
          h("span", { class: "watch", dataset: { state: "connecting" } }, h("span", { class: "conn-dot", "aria-hidden": "true" }), ""),
          h("span", { class: "badge badge-lg", id: "detail-status", dataset: { status } }, h("span", { class: "badge-dot", "aria-hidden": "true" }), statusLabel(status)),
          cancelBtn),
      ),
      progressBar(run),
      h(
        "dl",
        { class: "kvs" },
        kv(t("detail.tag"), h("span", null, run.tag ? h("span", { class: "chip" }, run.tag) : t("common.none"),
          (Array.isArray(run.tags) ? run.tags : []).filter((x) => x !== run.tag).map((x) => h("span", { class: "chip chip-soft" }, x)))),
        kv(t("detail.worker"), run.worker_id
          ? h("a", { class: "mono", href: "#/workers", title: t("nav.workers") }, run.worker_id,
            // only worth saying when the worker is gone (the enrichment is a point-in-time read)
            run.worker_alive === false && run.worker_state && !TERMINAL.has(run.status)
              ? h("span", { class: "warn" }, " · ", tOr("worker." + run.worker_state, run.worker_state)) : null)
          : h("span", { class: "muted" }, t("common.none"))),
        kv(t("detail.attempt"), run.attempt ? t("detail.attempt_of", { n: run.attempt, max: run.max_attempts || "?" }) : t("common.none")),
        WSYNC && WSYNC.runCode(run.wheels, { h }) ? kv(t("wsync.code"), WSYNC.runCode(run.wheels, { h })) : null,
        kv(t("detail.duration"), durationEl(run)),
        kv(t("detail.submitted"), timeValue(run.submitted_at)),
        kv(t("detail.started"), timeValue(run.start_time)),
        kv(t("detail.ended"), timeValue(run.end_time)),
        kv(t("detail.updated"), timeValue(run.updated_at)),
        run.workflow_yaml_sha256
          ? kv(t("detail.workflow_yaml"), h("span", { class: "mono", title: run.workflow_yaml_sha256 },
            "sha256 " + String(run.workflow_yaml_sha256).slice(0, 12),
            typeof run.workflow_yaml_bytes === "number" ? h("span", { class: "muted" }, " · " + run.workflow_yaml_bytes + " B") : null))
          : null,
        run.cancel_requested_at
          ? kv(t("detail.cancel_requested"), h("span", null, timeValue(run.cancel_requested_at),
            run.cancel_requested_by ? h("span", { class: "muted" }, " · ", t("detail.cancel_by", { who: run.cancel_requested_by })) : null))
          : null,
      ),
      run.error
        ? h("div", { class: "error-box" },
          h("div", { class: "error-title" }, t("detail.error"), run.failure_reason ? h("span", { class: "muted" }, " · ", t("detail.failure_reason", { reason: reasonLabel(run.failure_reason) })) : null),
          h("pre", { class: "pre pre-error", id: "detail-error" }, asText(run.error)))
        : null,
    );

    const params = run.params && typeof run.params === "object" ? run.params : {};
    const paramsCard = h(
      "div",
      { class: "card" },
      h("h2", null, t("detail.params")),
      Object.keys(params).length
        ? h("pre", { class: "pre", id: "detail-params" }, prettyJson(params))
        : h("p", { class: "muted" }, t("detail.no_params")),
    );

    const grid = h(
      "div",
      { class: "detail-grid" },
      h("div", { class: "detail-col" }, tasksCard(run), paramsCard),
      h("div", { class: "detail-col" }, h("div", { class: "card", id: "timeline-card" })),
    );
    clear(root);
    root.appendChild(head);
    root.appendChild(grid);
    const logsPane = window.PYOCO_LOGS && window.PYOCO_LOGS.pane(run, { h, clear, t, EventStream }); // static/logs.js
    if (logsPane && root.nextElementSibling !== logsPane) root.after(logsPane); // outside root: re-renders keep it as it is
    for (const d of root.querySelectorAll("details[data-key]")) {
      if (open.has(d.dataset.key)) d.open = true;
      else if (closed.has(d.dataset.key)) d.open = false;
    }
    renderTimeline();
    renderWatchBadge();
    setTitle();
  }

  function taskList(run) {
    const states = run.tasks && typeof run.tasks === "object" ? run.tasks : {};
    const records = run.task_records && typeof run.task_records === "object" ? run.task_records : {};
    const names = new Set([...Object.keys(states), ...Object.keys(records)]);
    const finished = TERMINAL.has(run.status);
    const list = [...names].map((name) => {
      const rec = records[name] && typeof records[name] === "object" ? records[name] : {};
      let state = rec.state || states[name] || "PENDING";
      // A task that started but never ended in a finished run was cut off: its process died or
      // was killed (a forced cancel, a lost worker).  The fold marks it CANCELLED or FAILED with
      // the run; it did neither on its own, so say what happened.
      const cutOff = state === "RUNNING" || ((state === "CANCELLED" || state === "FAILED") && typeof rec.started_at === "number" && typeof rec.ended_at !== "number");
      if (finished && cutOff) state = "INTERRUPTED";
      return { name, state, rec };
    });
    const order = { SUCCEEDED: 0, FAILED: 0, CANCELLED: 0, INTERRUPTED: 0, RUNNING: 1, PENDING: 2 };
    list.sort((a, b) => {
      const sa = a.rec.started_at, sb = b.rec.started_at;
      if (sa && sb && sa !== sb) return sa - sb;
      if (!!sa !== !!sb) return sa ? -1 : 1;
      return (order[a.state] ?? 3) - (order[b.state] ?? 3) || (a.name < b.name ? -1 : 1);
    });
    return list;
  }

  function waterfall(rec, state, axisStart, span, axisEnd) {
    const track = h("span", { class: "task-bar", "aria-hidden": "true" });
    if (typeof rec.started_at !== "number" || !isFinite(axisStart)) return track;
    const end = typeof rec.ended_at === "number" ? rec.ended_at : axisEnd;
    const left = Math.min(100, Math.max(0, ((rec.started_at - axisStart) / span) * 100));
    const width = Math.max(1, Math.min(100 - left, ((end - rec.started_at) / span) * 100));
    const fill = h("span", { class: "task-bar-fill", dataset: { state } });
    fill.style.left = left.toFixed(2) + "%";
    fill.style.width = width.toFixed(2) + "%";
    track.appendChild(fill);
    return track;
  }

  function progressBar(run) {
    const tasks = taskList(run);
    const bar = h("div", { class: "progress", role: "img" });
    if (!tasks.length) {
      bar.classList.add("progress-empty");
      return bar;
    }
    let done = 0;
    for (const task of tasks) {
      if (task.state !== "PENDING" && task.state !== "RUNNING") done++;
      bar.appendChild(h("span", { class: "seg", dataset: { state: task.state }, title: task.name + " · " + tOr("task." + task.state, task.state) }));
    }
    bar.setAttribute("aria-label", t("detail.tasks_progress", { done, total: tasks.length }));
    return bar;
  }

  function tasksCard(run) {
    const tasks = taskList(run);
    const done = tasks.filter((x) => x.state !== "PENDING" && x.state !== "RUNNING").length;
    const card = h(
      "div",
      { class: "card", id: "tasks-card" },
      h("div", { class: "card-head" }, h("h2", null, t("detail.tasks")), tasks.length ? h("span", { class: "muted" }, t("detail.tasks_progress", { done, total: tasks.length })) : null),
    );
    if (!tasks.length) {
      card.appendChild(h("p", { class: "muted" }, t("detail.no_tasks")));
      return card;
    }
    if (run.task_records_truncated) card.appendChild(h("p", { class: "muted" }, t("detail.tasks_truncated")));
    // a waterfall: each task's span on the run's own time axis
    const now = Date.now() / 1000;
    const starts = tasks.map((x) => x.rec.started_at).filter((v) => typeof v === "number");
    const axisStart = typeof run.start_time === "number" ? run.start_time : Math.min(...starts);
    const ends = tasks.map((x) => x.rec.ended_at).filter((v) => typeof v === "number");
    const axisEnd = typeof run.end_time === "number" ? run.end_time : TERMINAL.has(run.status) ? Math.max(axisStart, ...ends) : now;
    const span = Math.max(axisEnd - axisStart, 0.001);
    const list = h("div", { class: "tasks" });
    for (const task of tasks) {
      const rec = task.rec;
      const dur = typeof rec.duration_ms === "number" ? rec.duration_ms / 1000
        : rec.started_at && rec.ended_at ? rec.ended_at - rec.started_at
        : task.state === "RUNNING" && rec.started_at ? now - rec.started_at
        : task.state === "INTERRUPTED" && rec.started_at && typeof run.end_time === "number" ? Math.max(0, run.end_time - rec.started_at) : null;
      const durEl = h("span", { class: "dur num" }, fmtDuration(dur));
      if (task.state === "RUNNING" && rec.started_at) durEl.dataset.start = String(rec.started_at);
      const hasBody = rec.error || rec.traceback || rec.output !== undefined && rec.output !== null || (rec.inputs && Object.keys(rec.inputs).length);
      // one-line preview: the output of a finished task, the first line of an error
      let preview = "";
      if (rec.error) preview = asText(rec.error).split("\n")[0];
      else if (rec.output !== undefined && rec.output !== null) preview = asText(rec.output);
      const summary = h("summary", { class: "task-sum" },
        statusBadge(task.state, "task"),
        h("span", { class: "task-name-wrap" },
          h("span", { class: "task-name mono" }, task.name),
          rec.tries > 1 ? h("span", { class: "chip chip-soft task-tries" }, t("task.tries", { n: rec.tries })) : null,
          preview ? h("span", { class: "task-preview mono" + (rec.error ? " task-preview-error" : "") }, preview.slice(0, 200)) : null),
        h("span", { class: "task-dur" }, durEl),
        waterfall(rec, task.state, axisStart, span, axisEnd));
      const det = h("details", { class: "task", dataset: { key: "task:" + task.name, state: task.state, task: task.name } }, summary);
      if (task.state === "FAILED") det.open = true;
      if (hasBody) {
        const body = h("div", { class: "task-body" });
        if (rec.error) body.appendChild(h("div", { class: "sub" }, h("div", { class: "sub-title" }, t("task.error")), h("pre", { class: "pre pre-error task-error" }, asText(rec.error))));
        if (rec.traceback) body.appendChild(h("div", { class: "sub" }, h("div", { class: "sub-title" }, t("task.traceback")), h("pre", { class: "pre pre-tb task-traceback" }, asText(rec.traceback))));
        if (rec.output !== undefined && rec.output !== null)
          body.appendChild(h("div", { class: "sub" }, h("div", { class: "sub-title" }, t("task.output"), rec.output_truncated ? h("span", { class: "muted" }, " · ", t("task.output_truncated")) : null), h("pre", { class: "pre task-output" }, prettyJson(rec.output))));
        if (rec.inputs && Object.keys(rec.inputs).length)
          body.appendChild(h("div", { class: "sub" }, h("div", { class: "sub-title" }, t("task.inputs")), h("pre", { class: "pre" }, prettyJson(rec.inputs))));
        det.appendChild(body);
      } else {
        det.classList.add("task-empty");
      }
      list.appendChild(det);
    }
    card.appendChild(list);
    return card;
  }

  const EV_ICON = {
    "run.submitted": "↥", "run.claimed": "⚑", "run.worker_lost": "⚠", "run.released": "↺",
    "task.started": "▸", "task.completed": "✓", "task.failed": "✕", "run.cancel_requested": "⊘",
    "run.completed": "★", "run.failed": "✕", "run.cancelled": "■", "task.retry_scheduled": "↻",
  };
  function eventSummary(ev) {
    const d = ev.data && typeof ev.data === "object" ? ev.data : {};
    switch (ev.type) {
      case "run.submitted": return t("ev.sum.submitted", { flow: d.flow_name, tag: d.tag, max: d.max_attempts ?? "?" });
      case "run.claimed": return t("ev.sum.claimed", { worker: d.worker_id, attempt: d.attempt, lease: d.lease_seconds }) + (WSYNC ? WSYNC.claimedSuffix(d) : "");
      case "run.worker_lost": return t("ev.sum.worker_lost", { worker: d.worker_id || "?", by: d.detected_by });
      case "run.released": return t("ev.sum.released", { worker: d.worker_id, attempt: d.attempt, reason: d.reason });
      case "task.started": return t("ev.sum.task", { task: d.task });
      case "task.completed": {
        const secs = typeof d.duration_ms === "number" ? d.duration_ms / 1000 : d.started_at && d.ended_at ? d.ended_at - d.started_at : null;
        return t("ev.sum.task_done", { task: d.task, duration: fmtDuration(secs) });
      }
      case "task.failed": return t("ev.sum.failed", { reason: d.task, error: d.error });
      case "task.retry_scheduled": return t("ev.sum.retry", { task: d.task, n: d.try_number, max: d.max_tries, delay: fmtDuration(d.delay_sec), error: d.error });
      case "run.cancel_requested": return d.by ? t("ev.sum.cancel_requested", { by: d.by }) : t("ev.sum.cancel_requested_anon");
      case "run.completed": return "";
      case "run.failed": return t("ev.sum.failed", { reason: reasonLabel(d.reason), error: d.error });
      case "run.cancelled": return t("ev.sum.cancelled", { reason: reasonLabel(d.reason) }) + (d.by ? " · " + d.by : "");
      default: return "";
    }
  }

  function renderTimeline() {
    const card = $("timeline-card");
    if (!card) return;
    const open = new Set([...card.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
    clear(card);
    card.appendChild(h("div", { class: "card-head" }, h("h2", null, t("detail.timeline")), detail.events ? h("span", { class: "muted" }, String(detail.events.length)) : null));
    card.appendChild(h("p", { class: "muted small" }, t("detail.timeline_help")));
    if (detail.eventsError && !detail.events) {
      const msg = detail.eventsError instanceof ApiError ? detail.eventsError.describe() : String(detail.eventsError);
      card.appendChild(h("p", { class: "warn" }, t("detail.events_unavailable", { err: msg })));
      return;
    }
    if (!detail.events) {
      card.appendChild(h("p", { class: "muted" }, t("detail.loading")));
      return;
    }
    if (!detail.events.length) {
      card.appendChild(h("p", { class: "muted" }, t("detail.no_events")));
      return;
    }
    const first = detail.events[0].occurred_at;
    const list = h("ol", { class: "timeline", id: "timeline" });
    let lastAttempt = null;
    for (const ev of detail.events) {
      // a retried run: mark where each new attempt begins
      const evAttempt = (ev.producer && ev.producer.attempt) ?? (ev.data && ev.data.attempt) ?? null;
      if (ev.type === "run.claimed" && lastAttempt !== null && evAttempt !== null && evAttempt !== lastAttempt) {
        list.appendChild(h("li", { class: "ev-divider", dataset: { attempt: String(evAttempt) } }, h("span", null, t("ev.attempt", { n: evAttempt }))));
      }
      if (evAttempt !== null) lastAttempt = evAttempt;
      const type = String(ev.type || "");
      const producer = ev.producer && typeof ev.producer === "object" ? ev.producer : {};
      const d = ev.data && typeof ev.data === "object" ? ev.data : {};
      const attempt = producer.attempt ?? d.attempt;
      const kind = String(producer.kind || "");
      const typeLabel = tOr("ev." + type, type);
      const summary = eventSummary(ev);
      const sinceStart = typeof ev.occurred_at === "number" && typeof first === "number" ? ev.occurred_at - first : null;
      const item = h(
        "li",
        { class: "ev", dataset: { type, kind } },
        h("span", { class: "ev-icon", "aria-hidden": "true" }, EV_ICON[type] || "•"),
        h(
          "div",
          { class: "ev-main" },
          h("div", { class: "ev-line" },
            h("span", { class: "ev-seq mono" }, "#" + (ev.seq ?? "?")),
            h("span", { class: "ev-type" }, typeLabel),
            h("span", { class: "ev-who" },
              h("span", { class: "chip chip-who", dataset: { kind } }, tOr("ev.producer." + kind, kind)),
              producer.id ? h("span", { class: "mono ev-who-id" }, producer.id) : null,
              attempt ? h("span", { class: "chip chip-soft" }, t("ev.attempt", { n: attempt })) : null),
            h("span", { class: "ev-time num", title: fmtAbsolute(ev.occurred_at, true) },
              fmtAbsolute(ev.occurred_at, true),
              sinceStart !== null && sinceStart > 0 ? h("span", { class: "muted" }, " ", t("ev.since_start", { d: fmtDuration(sinceStart) })) : null)),
          h("div", { class: "ev-foot" },
            h("span", { class: "ev-summary" }, summary),
            d.traceback ? h("details", { class: "ev-raw", dataset: { key: "tb:" + ev.seq } }, h("summary", null, t("task.traceback")), h("pre", { class: "pre pre-tb" }, asText(d.traceback))) : null,
            h("details", { class: "ev-raw", dataset: { key: "raw:" + ev.seq } }, h("summary", null, t("detail.raw")), h("pre", { class: "pre" }, prettyJson(ev)))),
        ),
      );
      list.appendChild(item);
    }
    card.appendChild(list);
    for (const d of card.querySelectorAll("details[data-key]")) if (open.has(d.dataset.key)) d.open = true;
  }

  function confirmCancel(runId) {
    const dlg = $("cancel-dialog");
    $("cancel-dialog-run").textContent = runId;
    dlg.returnValue = "";
    dlg.onclose = async () => {
      if (dlg.returnValue !== "yes" || detail.id !== runId) return;
      detail.cancelling = true;
      renderDetail();
      try {
        const snap = await api("/runs/" + encodeURIComponent(runId) + "/cancel", { method: "POST", json: {} });
        toast(t("detail.cancel_sent"), "ok");
        if (snap && snap.run_id === runId) applyDetailSnapshot(snap);
      } catch (e) {
        noteError(e);
        toast(e instanceof ApiError ? e.describe() : String(e), "error");
      } finally {
        detail.cancelling = false;
        renderDetail();
        if (detail.stream && detail.stream.stopped) detail.stream.start();
      }
    };
    dlg.showModal();
    $("cancel-no").focus();
  }

  async function copyId(btn, id) {
    try {
      await navigator.clipboard.writeText(id);
      btn.textContent = t("detail.copied");
      setTimeout(() => { btn.textContent = t("detail.copy"); }, 1200);
    } catch (_) {
      const sel = window.getSelection();
      const range = document.createRange();
      range.selectNodeContents($("detail-run-id"));
      sel.removeAllRanges();
      sel.addRange(range);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // workers

  let workersTimer = null;
  async function loadWorkers() {
    try {
      const body = await api("/workers?scope=all&include_hidden=true&limit=500");
      workers.items = Array.isArray(body) ? body : (body && body.items) || [];
      workers.loaded = true;
      noteOk();
    } catch (e) {
      noteError(e);
    }
    renderWorkers();
  }
  function startWorkersPolling() {
    stopWorkersPolling();
    loadWorkers();
    workersTimer = setInterval(() => { if (!document.hidden) loadWorkers(); }, 3000);
  }
  function stopWorkersPolling() {
    clearInterval(workersTimer);
    workersTimer = null;
  }

  async function setHidden(worker, hidden) {
    const id = worker.worker_id;
    workers.busy.add(id);
    renderWorkers();
    try {
      await api("/workers/" + encodeURIComponent(id), { method: "PATCH", json: { hidden } });
      worker.hidden = hidden;
      toast(t(hidden ? "workers.hid" : "workers.unhid", { id }), "ok");
      await loadWorkers();
    } catch (e) {
      noteError(e);
      toast(e instanceof ApiError ? e.describe() : String(e), "error");
    } finally {
      workers.busy.delete(id);
      renderWorkers();
    }
  }

  function renderWorkers() {
    if (route.view !== "workers") return;
    const all = workers.items;
    const hiddenCount = all.filter((w) => w.hidden).length;
    $("w-hidden").checked = workers.showHidden;
    $("w-hidden-label").textContent = t("workers.show_hidden", { n: hiddenCount });
    const pool = all.filter((w) => workers.showHidden || !w.hidden);
    const counts = {};
    for (const w of pool) counts[w.state] = (counts[w.state] || 0) + 1;
    const chips = clear($("w-states"));
    const mk = (value, label, n) => h("button", {
      type: "button", class: "chip-btn", "aria-pressed": String(workers.stateFilter === value), dataset: { state: value || "ALL" },
      onclick: () => { workers.stateFilter = value; renderWorkers(); },
    }, value ? h("span", { class: "badge-dot", dataset: { status: value } }) : null, label, h("span", { class: "count" }, String(n)));
    chips.appendChild(mk("", t("workers.state_all"), pool.length));
    for (const s of WORKER_STATES) chips.appendChild(mk(s, tOr("worker." + s, s), counts[s] || 0));

    const grid = clear($("workers-grid"));
    const shown = pool.filter((w) => !workers.stateFilter || w.state === workers.stateFilter);
    const rank = { RUNNING: 0, IDLE: 1, DISCONNECTED: 2, STOPPED_GRACEFUL: 3 };
    shown.sort((a, b) => (rank[a.state] ?? 4) - (rank[b.state] ?? 4) || String(a.worker_id).localeCompare(String(b.worker_id)));
    for (const w of shown) grid.appendChild(workerCard(w));
    const empty = $("workers-empty");
    empty.hidden = !!shown.length || !workers.loaded;
    empty.textContent = all.length ? t("workers.empty_filtered") : t("workers.empty");
  }

  function slotsEl(used, total) {
    const bar = h("span", { class: "slots-bar", "aria-hidden": "true" });
    for (let i = 0; i < Math.min(total, 32); i++) bar.appendChild(h("span", { class: "slot" + (i < used ? " slot-used" : "") }));
    return h("span", { class: "slots" }, bar, h("span", { class: "num" }, used + " / " + total));
  }

  function workerCard(w) {
    const state = w.state || "IDLE";
    const hb = w.last_heartbeat_at || w.heartbeat_at || w.last_seen_at;
    const tags = Array.isArray(w.tags) ? w.tags : [];
    const busy = workers.busy.has(w.worker_id);
    const current = Array.isArray(w.current_run_ids) && w.current_run_ids.length
      ? w.current_run_ids.filter((x) => typeof x === "string")
      : w.current_run_id ? [String(w.current_run_id)] : [];
    const btn = h("button", {
      type: "button", class: "btn btn-small" + (w.hidden ? "" : " btn-ghost"), disabled: busy,
      dataset: { action: w.hidden ? "unhide" : "hide" },
      onclick: () => setHidden(w, !w.hidden),
    }, w.hidden ? t("workers.unhide") : t("workers.hide"));
    const lastRun = w.last_run_id
      ? h("span", null, h("a", { href: runHref(w.last_run_id), class: "mono" }, shortId(w.last_run_id)), " ", w.last_run_status ? statusBadge(w.last_run_status) : null)
      : h("span", { class: "muted" }, t("workers.none"));
    return h(
      "article",
      { class: "card worker" + (w.hidden ? " worker-hidden" : ""), dataset: { workerId: w.worker_id, state } },
      h("div", { class: "worker-head" },
        h("div", { class: "worker-name mono", title: w.worker_id }, w.worker_id),
        statusBadge(state, "worker"),
        w.hidden ? h("span", { class: "chip chip-soft chip-hidden" }, t("workers.hidden")) : null),
      state === "DISCONNECTED" ? h("p", { class: "warn small" }, t("workers.lost")) : null,
      state === "STOPPED_GRACEFUL" ? h("p", { class: "muted small" }, t("workers.stopped")) : null,
      h("dl", { class: "kvs kvs-tight" },
        kv(t("workers.tags"), tags.length ? h("span", null, tags.map((x) => h("span", { class: "chip" }, x))) : h("span", { class: "muted" }, t("workers.none"))),
        typeof w.concurrency === "number" && w.concurrency > 0 ? kv(t("workers.slots"), slotsEl(current.length, w.concurrency)) : null,
        kv(t("workers.current_run"), current.length
          ? h("span", { class: "run-links" }, current.slice(0, 6).map((id) => h("a", { href: runHref(id), class: "mono current-run", title: id }, shortId(id))),
            current.length > 6 ? h("span", { class: "muted" }, "+" + (current.length - 6)) : null)
          : h("span", { class: "muted" }, t("workers.none"))),
        kv(t("workers.last_run"), lastRun),
        kv(t("workers.heartbeat"), relTime(hb)),
        typeof w.completed_runs === "number" ? kv(t("workers.completed"), h("span", { class: "num" }, String(w.completed_runs))) : null,
        w.hostname ? kv(t("workers.host"), h("span", { class: "mono" }, w.hostname, w.pid ? h("span", { class: "muted" }, " · pid " + w.pid) : null)) : null,
        w.instance_id && w.instance_id !== w.worker_id ? kv(t("workers.instance"), h("span", { class: "mono muted" }, shortId(w.instance_id))) : null,
        WSYNC ? WSYNC.workerKvs(w, { h, t, kv, relTime }) : null),
      h("div", { class: "worker-foot" }, btn),
    );
  }

  // ---------------------------------------------------------------------------------------------
  // metrics strip

  function parseProm(text) {
    const out = [];
    for (const line of String(text).split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
      if (!m) continue;
      const labels = {};
      if (m[3]) for (const lm of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]] = lm[2];
      out.push({ name: m[1], labels, value: parseFloat(m[4]) });
    }
    return out;
  }
  let metricsTimer = null;
  let metricsInFlight = false;
  /** Counts move with the run stream: re-read them shortly after a change (coalesced). */
  function scheduleMetrics() {
    if (metricsTimer) return;
    metricsTimer = setTimeout(async () => {
      if (metricsInFlight) {
        metricsTimer = null;
        scheduleMetrics();
        return;
      }
      metricsInFlight = true;
      try {
        await loadMetrics();
      } finally {
        metricsInFlight = false;
        metricsTimer = null;
      }
    }, 400);
  }
  async function loadMetrics() {
    try {
      const text = await api("/metrics");
      const samples = parseProm(text);
      const byStatus = {};
      let queue = null, lag = null, alive = null, dlq = null;
      for (const s of samples) {
        if (s.name === "pyoco_runs_total" && s.labels.status) byStatus[s.labels.status] = (byStatus[s.labels.status] || 0) + s.value;
        else if (s.name === "pyoco_workers_alive_total") alive = s.value;
        else if (s.name === "pyoco_dlq_messages_total") dlq = s.value;
        else if (/^pyoco_\w*queue/.test(s.name)) queue = (queue || 0) + s.value; // e.g. pyoco_queue_depth{tag=...}
        else if (/^pyoco_projector_lag/.test(s.name)) lag = (lag || 0) + s.value;
      }
      metrics = { byStatus, queue, lag, alive, dlq, error: null };
    } catch (e) {
      metrics = { ...(metrics || { byStatus: {} }), error: e };
    }
    renderMetrics();
  }
  function renderMetrics() {
    const root = clear($("metrics"));
    if (!metrics) return;
    const group = h("div", { class: "metric-group" });
    for (const s of RUN_STATUSES) {
      const n = metrics.byStatus[s] || 0;
      group.appendChild(h("button", {
        type: "button", class: "metric metric-status" + (filters.status === s ? " active" : ""), dataset: { status: s },
        title: t("metrics.title_status", { status: statusLabel(s) }),
        onclick: () => {
          filters.status = filters.status === s ? "" : s;
          $("f-status").value = filters.status;
          if (route.view !== "runs") location.hash = "#/runs";
          filtersChanged();
          renderMetrics();
        },
      }, h("span", { class: "badge-dot", "aria-hidden": "true" }), h("span", { class: "metric-label" }, statusLabel(s)), h("span", { class: "metric-value num" }, String(n))));
    }
    root.appendChild(group);
    const sys = h("div", { class: "metric-group metric-sys" });
    const add = (label, value, cls, id) => sys.appendChild(h("span", { class: "metric " + (cls || ""), id }, h("span", { class: "metric-label" }, label), h("span", { class: "metric-value num" }, value)));
    if (metrics.alive !== null) add(t("metrics.workers"), String(metrics.alive), "", "m-workers");
    if (metrics.queue !== null) add(t("metrics.queue"), String(metrics.queue), metrics.queue > 0 ? "metric-hot" : "", "m-queue");
    if (metrics.lag !== null) add(t("metrics.lag"), String(metrics.lag), metrics.lag > 100 ? "metric-hot" : "", "m-lag");
    if (metrics.dlq) add(t("metrics.dlq"), String(metrics.dlq), "metric-hot", "m-dlq");
    if (metrics.error) sys.appendChild(h("span", { class: "metric metric-err" }, t("metrics.unavailable")));
    root.appendChild(sys);
  }

  // ---------------------------------------------------------------------------------------------
  // toasts

  function toast(msg, kind) {
    const el = h("div", { class: "toast toast-" + (kind || "info"), role: "status" }, msg);
    $("toasts").appendChild(el);
    setTimeout(() => el.classList.add("out"), 3200);
    setTimeout(() => el.remove(), 3700);
  }

  // ---------------------------------------------------------------------------------------------
  // auth dialog

  function renderAuthButton() {
    const set = !!load(LS.authKey, "");
    $("auth-open").classList.toggle("auth-set", set);
    $("auth-open-text").textContent = set ? t("auth.button_set") : t("auth.button");
  }
  function setupAuth() {
    const dlg = $("auth-dialog");
    $("auth-open").addEventListener("click", () => {
      $("auth-header").value = load(LS.authHeader, "X-API-Key");
      $("auth-key").value = load(LS.authKey, "");
      $("auth-key").type = "password";
      dlg.showModal();
    });
    $("auth-show").addEventListener("click", () => {
      const k = $("auth-key");
      k.type = k.type === "password" ? "text" : "password";
    });
    $("auth-close").addEventListener("click", () => dlg.close());
    $("auth-clear").addEventListener("click", () => {
      store(LS.authKey, null);
      $("auth-key").value = "";
      dlg.close();
      toast(t("auth.cleared"), "ok");
      authChanged();
    });
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      store(LS.authHeader, $("auth-header").value.trim() || "X-API-Key");
      store(LS.authKey, $("auth-key").value.trim());
      dlg.close();
      toast(t("auth.saved"), "ok");
      authChanged();
    });
  }
  function authChanged() {
    renderAuthButton();
    if (window.pyocoAuthState) window.pyocoAuthState.check(true); // static/auth.js: required / refused / tenant
    runStream.restart();
    loadFirstPage();
    loadMetrics();
    if (route.view === "workers") loadWorkers();
    if (route.view === "run" && route.runId) {
      const id = route.runId;
      closeDetail();
      openDetail(id);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // routing

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/runs";
    const [path, qs] = raw.split("?");
    const parts = path.split("/").filter(Boolean);
    if (parts[0] === "workers") return { view: "workers", runId: null, qs };
    if (extViews[parts[0]] || pages[parts[0]]) return { view: parts[0], runId: null, qs };
    if (parts[0] === "runs" && parts[1]) return { view: "run", runId: decodeURIComponent(parts.slice(1).join("/")), qs };
    return { view: "runs", runId: null, qs };
  }
  let runsScroll = 0;
  let booted = false;
  function onRoute() {
    const next = parseHash();
    if (route.view === "runs" && next.view !== "runs") runsScroll = window.scrollY;
    route.view = next.view;
    route.runId = next.runId;
    for (const v of ["runs", "run", "workers", ...Object.keys(extViews), ...Object.keys(pages)]) $("view-" + v).hidden = v !== route.view;
    for (const [name, view] of Object.entries(extViews)) view.shown(route.view === name);
    $("tab-runs").setAttribute("aria-current", route.view === "runs" || route.view === "run" ? "page" : "false");
    $("tab-workers").setAttribute("aria-current", route.view === "workers" ? "page" : "false");
    for (const p of Object.values(pages)) {
      $(p.tab).setAttribute("aria-current", route.view === p.name ? "page" : "false");
      if (route.view === p.name) p.show(); else p.hide();
    }
    if (route.view === "runs" && next.qs !== undefined) {
      const p = new URLSearchParams(next.qs);
      const changed = ["status", "flow", "tag"].some((k) => (p.get(k) || "") !== filters[k]);
      filters.status = p.get("status") || "";
      filters.flow = p.get("flow") || "";
      filters.tag = p.get("tag") || "";
      filters.q = p.get("q") || "";
      filters.worker = p.get("worker") || "";
      syncFilterInputs();
      // at start-up the first page is read with these filters anyway; later changes reload it
      if (changed && booted) filtersChanged();
    }
    if (route.view === "run") openDetail(route.runId);
    else closeDetail();
    if (route.view === "workers") startWorkersPolling();
    else stopWorkersPolling();
    applyStaticI18n();
    renderAll();
    window.scrollTo(0, route.view === "runs" ? runsScroll : 0);
  }
  function syncFilterInputs() {
    $("f-status").value = filters.status;
    $("f-flow").value = filters.flow;
    $("f-tag").value = filters.tag;
    $("f-search").value = filters.q;
    $("f-worker").value = filters.worker;
    $("f-sort").value = sortMode;
  }

  function renderAll() {
    renderConn();
    renderAuthButton();
    renderMetrics();
    if (route.view === "runs") {
      // rows carry the language in their stamp, so they re-render themselves
      renderRuns();
    } else if (route.view === "run") renderDetail();
    else if (extViews[route.view]) extViews[route.view].render();
    else if (pages[route.view]) pages[route.view].render();
    else renderWorkers();
    if (lastOk) $("footer-updated").textContent = t("footer.updated", { time: fmtAbsolute(lastOk) });
  }

  // ---------------------------------------------------------------------------------------------
  // wiring

  /** Give each registered page the helpers it may use (text only ever via h()/textContent). */
  function setupPages() {
    const ui = { api, h, clear, t, toast, noteOk, noteError, relTime, fmtAbsolute, authHeaders, ApiError, get lang() { return lang; } };
    for (const p of window.PYOCO_PAGES || []) {
      pages[p.name] = p;
      p.init(ui);
    }
  }

  function setup() {
    for (const extend of window.pyocoExtensions || []) extend(extensionApi);
    setupPages();
    applyStaticI18n();
    fillStatusSelect();
    syncFilterInputs();
    setupAuth();
    for (const b of document.querySelectorAll("#lang-switch button")) b.addEventListener("click", () => setLang(b.dataset.lang));
    $("conn").addEventListener("click", () => runStream.restart());
    $("f-status").addEventListener("change", (e) => { filters.status = e.target.value; renderMetrics(); filtersChanged(); });
    $("f-flow").addEventListener("input", (e) => { filters.flow = e.target.value.trim(); filtersChanged(); });
    $("f-tag").addEventListener("input", (e) => { filters.tag = e.target.value.trim(); filtersChanged(); });
    $("f-search").addEventListener("input", (e) => { filters.q = e.target.value; syncFiltersToHash(); renderRuns(); });
    $("f-worker").addEventListener("input", (e) => { filters.worker = e.target.value; syncFiltersToHash(); renderRuns(); });
    $("f-search").addEventListener("keydown", (e) => { if (e.key === "Enter") searchExact(e.target.value); });
    $("f-sort").addEventListener("change", (e) => { sortMode = e.target.value; store(LS.sort, sortMode); renderRuns(); });
    $("f-clear").addEventListener("click", () => {
      filters.status = filters.flow = filters.tag = filters.q = filters.worker = "";
      syncFilterInputs();
      renderMetrics();
      filtersChanged();
    });
    $("runs-more").addEventListener("click", loadMore);
    $("filters-toggle").addEventListener("click", () => {
      // narrow windows fold the filters away behind this button
      const open = $("runs-toolbar").classList.toggle("filters-open");
      $("filters-toggle").setAttribute("aria-expanded", String(open));
    });
    $("w-hidden").addEventListener("change", (e) => {
      workers.showHidden = e.target.checked;
      store(LS.showHidden, workers.showHidden ? "1" : "0");
      renderWorkers();
    });
    window.addEventListener("hashchange", onRoute);
    document.addEventListener("keydown", (e) => {
      // "/" jumps to the run search, as in most tools
      const typing = e.target instanceof HTMLElement && e.target.closest("input, select, textarea, dialog");
      if (e.key === "/" && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
        e.preventDefault();
        if (route.view !== "runs") location.hash = "#/runs";
        $("f-search").focus();
      }
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) loadMetrics(); });
    setInterval(tick, 1000);
    setInterval(() => { if (conn.state === "reconnecting") renderConn(); }, 500);
    setInterval(() => { if (!document.hidden) loadMetrics(); }, 5000);

    onRoute();
    booted = true;
    // the first page is read once the list stream is open (onOpen), so no change can slip
    // between the two; if the stream cannot open, the page is read anyway (onState)
    runStream.start();
    loadMetrics();
  }

  // Extensions (their own files: dlq.js, bulk.js) push a function onto window.pyocoExtensions;
  // setup() calls each with these helpers.  registerView(name, {render, shown(bool)}) serves
  // #/<name> in <section id="view-<name>">; onRunRow(fn) may decorate each runs-list row.
  const extViews = {};
  const runRowHooks = [];
  const extensionApi = {
    $, h, clear, t, tOr, api, ApiError, toast, noteError, noteOk, statusBadge, fmtAbsolute, relTime, runHref, shortId, asText, prettyJson,
    ACTIVE, TERMINAL,
    registerView(name, view) { extViews[name] = view; },
    onRunRow(fn) { runRowHooks.push(fn); },
    get route() { return { ...route }; },
    get lang() { return lang; },
    get filters() { return { ...filters }; },
    visibleRuns: () => sortedVisibleRuns(),
    rerenderRuns() { runs.rows.clear(); clear($("runs-list")); renderRuns(); },
  };

  // test hook: read-only view of what the page believes
  window.pyocoDashboard = {
    get lang() { return lang; },
    get connection() { return conn.state; },
    get runCount() { return runs.items.size; },
    /** Drop the live list stream as a network failure would (it reconnects by itself). */
    dropLiveStream() { if (runStream.controller) runStream.controller.abort(); },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
