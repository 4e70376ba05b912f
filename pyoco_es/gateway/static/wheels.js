/* pyoco-es dashboard: the Wheels page (GET /wheels, GET /wheels/history, DELETE /wheels/{name}).
 *
 * Registered with app.js through window.PYOCO_PAGES (app.js calls init(ui) with its helpers).
 * Same safety rule as app.js: server text reaches the page only through ui.h() (text nodes and
 * inert attributes), never innerHTML.  Polled every 5 s while visible (the registry has no stream).
 */
"use strict";

(() => {
  const POLL_MS = 5000;
  const HISTORY_LIMIT = 50;

  /** "demo_pkg-1.2.0-py3-none-any.whl" → {pkg: "demo-pkg", version: "1.2.0"} (PEP 427/503). */
  function parseName(name) {
    const parts = String(name).replace(/\.whl$/, "").split("-");
    return { pkg: (parts[0] || "").toLowerCase().replace(/[-_.]+/g, "-"), version: parts[1] || "" };
  }

  /** Compare two PEP 440 versions well enough to order releases (numeric parts, then text). */
  function versionCmp(a, b) {
    const pa = String(a).split(/[.+-]/), pb = String(b).split(/[.+-]/);
    for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
      const x = pa[i] ?? "0", y = pb[i] ?? "0";
      const nx = /^\d+$/.test(x), ny = /^\d+$/.test(y);
      const c = nx && ny ? Number(x) - Number(y) : x.localeCompare(y);
      if (c) return c;
    }
    return 0;
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1024 / 1024).toFixed(1) + " MiB";
  }

  const page = {
    name: "wheels",
    tab: "tab-wheels",
    title: "nav.wheels",
    ui: null,
    items: [],
    history: [],
    loaded: false,
    error: null,
    busy: new Set(),
    timer: null,

    init(ui) {
      this.ui = ui;
    },
    show() {
      if (this.timer) return;
      this.load();
      this.timer = setInterval(() => { if (!document.hidden) this.load(); }, POLL_MS);
    },
    hide() {
      if (this.timer) clearInterval(this.timer);
      this.timer = null;
    },

    async load() {
      const { api, noteOk, noteError } = this.ui;
      try {
        const [items, history] = await Promise.all([api("/wheels"), api("/wheels/history?limit=" + HISTORY_LIMIT)]);
        this.items = Array.isArray(items) ? items.filter((w) => w && typeof w.name === "string") : [];
        this.history = Array.isArray(history) ? history.filter((e) => e && typeof e === "object") : [];
        this.loaded = true;
        this.error = null;
        noteOk();
      } catch (e) {
        this.error = e;
        noteError(e);
      }
      this.render();
    },

    render() {
      if (!this.ui || document.getElementById("view-wheels").hidden) return;
      this.renderList();
      this.renderHistory();
    },

    renderList() {
      const { h, clear, t, relTime } = this.ui;
      const root = clear(document.getElementById("wheels-list"));
      const empty = document.getElementById("wheels-empty");
      // newest version of each package first within the package; packages by name
      const rows = this.items.map((w) => ({ w, ...parseName(w.name) }));
      const latest = {};
      for (const r of rows) if (!latest[r.pkg] || versionCmp(r.version, latest[r.pkg]) > 0) latest[r.pkg] = r.version;
      rows.sort((a, b) => a.pkg.localeCompare(b.pkg) || versionCmp(b.version, a.version));
      empty.hidden = !this.loaded || rows.length > 0;
      empty.textContent = t("wheels.empty");
      if (!rows.length) return;
      const table = h("table", { class: "table wheels-table" },
        h("thead", null, h("tr", null,
          h("th", null, t("wheels.col_package")), h("th", null, t("wheels.col_version")), h("th", null, t("wheels.col_tags")),
          h("th", { class: "num" }, t("wheels.col_size")), h("th", null, t("wheels.col_uploaded")), h("th", null, ""))));
      const body = h("tbody");
      for (const r of rows) {
        const w = r.w;
        const tags = Array.isArray(w.tags) ? w.tags.filter((x) => typeof x === "string") : [];
        const mtime = Date.parse(w.mtime);
        const isLatest = latest[r.pkg] === r.version;
        body.appendChild(h("tr", { dataset: { wheel: w.name } },
          h("td", null, h("span", { class: "mono" }, r.pkg)),
          h("td", null, h("span", { class: "mono", title: w.name }, r.version),
            isLatest ? h("span", { class: "chip chip-soft wheel-latest", title: t("wheels.latest_hint") }, t("wheels.latest")) : null),
          h("td", null, tags.length ? tags.map((x) => h("span", { class: "chip" }, x)) : h("span", { class: "muted" }, t("wheels.all_workers"))),
          h("td", { class: "num" }, fmtBytes(w.size_bytes)),
          h("td", null, isFinite(mtime) ? relTime(mtime / 1000) : ""),
          h("td", { class: "wheel-actions" },
            h("button", { type: "button", class: "btn btn-small btn-ghost", dataset: { action: "download" }, onclick: () => this.download(w.name) }, t("wheels.download")),
            h("button", { type: "button", class: "btn btn-small btn-danger", dataset: { action: "delete" }, disabled: this.busy.has(w.name),
              onclick: () => this.confirmDelete(w.name) }, t("wheels.delete")))));
      }
      table.appendChild(body);
      root.appendChild(table);
    },

    renderHistory() {
      const { h, clear, t, fmtAbsolute } = this.ui;
      const root = clear(document.getElementById("wheels-history"));
      if (!this.history.length) {
        root.appendChild(h("p", { class: "muted" }, this.loaded ? t("wheels.history_empty") : ""));
        return;
      }
      const table = h("table", { class: "table wheels-history-table" },
        h("thead", null, h("tr", null,
          h("th", null, t("wheels.col_when")), h("th", null, t("wheels.col_action")), h("th", null, t("wheels.col_wheel")),
          h("th", null, t("wheels.col_tags")), h("th", null, t("wheels.col_who")), h("th", null, t("wheels.col_sha256")))));
      const body = h("tbody");
      for (const e of this.history) {
        const actor = e.actor && typeof e.actor === "object" ? e.actor : {};
        const source = e.source && typeof e.source === "object" ? e.source : {};
        const who = [actor.tenant_id, actor.api_key_id].filter((x) => typeof x === "string" && x).join(" / ") || t("wheels.anonymous");
        const from = typeof source.remote_addr === "string" ? source.remote_addr : "";
        const tags = Array.isArray(e.tags) ? e.tags.filter((x) => typeof x === "string") : [];
        const sha = typeof e.sha256_hex === "string" ? e.sha256_hex : "";
        body.appendChild(h("tr", { dataset: { action: String(e.action || "") } },
          h("td", null, typeof e.occurred_at === "number" ? fmtAbsolute(e.occurred_at) : ""),
          h("td", null, h("span", { class: "chip chip-soft wheel-" + (e.action === "delete" ? "deleted" : "uploaded") },
            t(e.action === "delete" ? "wheels.action_delete" : "wheels.action_upload"))),
          h("td", null, h("span", { class: "mono" }, String(e.wheel_name || ""))),
          h("td", null, tags.map((x) => h("span", { class: "chip" }, x))),
          h("td", null, who, from ? h("span", { class: "muted" }, " · " + from) : null),
          h("td", null, h("span", { class: "mono muted", title: sha }, sha.slice(0, 12)))));
      }
      table.appendChild(body);
      root.appendChild(table);
    },

    confirmDelete(name) {
      const dlg = document.getElementById("wheel-delete-dialog");
      document.getElementById("wheel-delete-name").textContent = name;
      dlg.returnValue = "";
      dlg.onclose = () => { if (dlg.returnValue === "yes") this.remove(name); };
      dlg.showModal();
      document.getElementById("wheel-delete-no").focus();
    },

    async remove(name) {
      const { api, t, toast, ApiError } = this.ui;
      this.busy.add(name);
      this.render();
      try {
        await api("/wheels/" + encodeURIComponent(name), { method: "DELETE" });
        toast(t("wheels.deleted", { name }), "ok");
      } catch (e) {
        toast(e instanceof ApiError ? e.describe() : String(e), "error");
      } finally {
        this.busy.delete(name);
        await this.load();
      }
    },

    async download(name) {
      const { authHeaders, toast, t } = this.ui;
      try {
        const res = await fetch("/wheels/" + encodeURIComponent(name), { headers: authHeaders(), cache: "no-store" });
        if (!res.ok) throw new Error(res.status + " " + res.statusText);
        const url = URL.createObjectURL(await res.blob());
        const a = document.createElement("a");
        a.href = url;
        a.download = name;
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (e) {
        toast(t("wheels.download_failed", { name, error: String(e && e.message ? e.message : e) }), "error");
      }
    },
  };

  (window.PYOCO_PAGES = window.PYOCO_PAGES || []).push(page);
})();
