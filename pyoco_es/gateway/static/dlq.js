/* pyoco-es dashboard: the Dead letters page (#/dlq), issue 15.
 *
 * Lists GET /dlq (newest first, "Show more" follows next_cursor), shows one dead letter's payload
 * (GET /dlq/{id}) as text, re-submits it as a new run (POST /dlq/{id}/resubmit) and drops it
 * (DELETE /dlq/{id}) after a confirmation.  A dead letter already re-submitted lists each new run
 * (with when and which key) from the server's "resubmitted" field.  Same safety rule as app.js: server text reaches the
 * page only through textContent (h() children) and inert attributes; nothing assigns HTML.
 */
"use strict";

(window.pyocoExtensions = window.pyocoExtensions || []).push((ui) => {
  const { $, h, clear, t, api, ApiError, toast, noteError, noteOk, fmtAbsolute, relTime, runHref, asText, prettyJson } = ui;
  const state = { items: [], cursor: null, loaded: false, loading: false, error: null, open: null, openBody: null, busy: new Set(), timer: null };

  // the tab and the page
  const tab = h("a", { class: "tab", id: "tab-dlq", href: "#/dlq", dataset: { i18n: "nav.dlq" } }, "Dead letters");
  document.querySelector("nav.tabs").appendChild(tab);
  const section = h("section", { id: "view-dlq", class: "view", hidden: true },
    h("div", { class: "toolbar" },
      h("p", { class: "muted", dataset: { i18n: "dlq.help" } }),
      h("span", { class: "spacer" }),
      h("button", { type: "button", class: "btn", id: "dlq-refresh", dataset: { i18n: "dlq.refresh" } }, "Refresh")),
    h("div", { class: "card dlq-card" }, h("div", { id: "dlq-list", class: "dlq-list", role: "list" }),
      h("div", { id: "dlq-empty", class: "empty", hidden: true }),
      h("div", { class: "runs-foot" }, h("span", { id: "dlq-count", class: "muted" }),
        h("button", { type: "button", class: "btn", id: "dlq-more", hidden: true, dataset: { i18n: "runs.load_more" } }, "Show more"))));
  $("main").appendChild(section);
  const dialog = h("dialog", { id: "dlq-drop-dialog", class: "dialog" },
    h("form", { method: "dialog" },
      h("h2", { dataset: { i18n: "dlq.drop_confirm_title" } }, "Drop this dead letter?"),
      h("p", { class: "mono", id: "dlq-drop-what" }),
      h("p", { class: "muted", dataset: { i18n: "dlq.drop_confirm_body" } }),
      h("div", { class: "dialog-actions" }, h("span", { class: "spacer" }),
        h("button", { type: "submit", class: "btn", value: "no", id: "dlq-drop-no", dataset: { i18n: "dlq.keep" } }, "Keep"),
        h("button", { type: "submit", class: "btn btn-danger", value: "yes", id: "dlq-drop-yes", dataset: { i18n: "dlq.drop" } }, "Drop"))));
  document.body.appendChild(dialog);

  async function load(more) {
    if (state.loading) return;
    state.loading = true;
    render();
    try {
      const q = "/dlq?limit=50" + (more && state.cursor ? "&before=" + encodeURIComponent(state.cursor) : "");
      const body = await api(q);
      state.items = more ? state.items.concat(body.items || []) : body.items || [];
      state.cursor = body.next_cursor || null;
      state.total = body.total;
      state.error = null;
      state.loaded = true;
      noteOk();
    } catch (e) {
      state.error = e;
      noteError(e);
    } finally {
      state.loading = false;
      render();
    }
  }

  async function toggle(item) {
    if (state.open === item.id) {
      state.open = null;
      state.openBody = null;
      render();
      return;
    }
    state.open = item.id;
    state.openBody = null;
    render();
    try {
      state.openBody = await api("/dlq/" + encodeURIComponent(item.id));
    } catch (e) {
      state.openBody = { failed: e instanceof ApiError ? e.describe() : String(e) };
    }
    render();
  }

  async function resubmit(item) {
    state.busy.add(item.id);
    render();
    try {
      const res = await api("/dlq/" + encodeURIComponent(item.id) + "/resubmit", { method: "POST" });
      toast(t("dlq.resubmitted", { run: res.run_id }), "ok");
      state.resubmitted = { ...(state.resubmitted || {}), [item.id]: res.run_id };
      await refreshMarks(item);
    } catch (e) {
      toast(e instanceof ApiError ? (e.status === 409 ? asText(e.detail) : e.describe()) : String(e), "error");
    } finally {
      state.busy.delete(item.id);
      render();
    }
  }

  async function refreshMarks(item) {
    // the server's record of the re-submissions (who, when), as a reload would show it
    try {
      const fresh = await api("/dlq/" + encodeURIComponent(item.id));
      state.items = state.items.map((x) => (x.id === item.id ? { ...x, resubmitted: fresh.resubmitted } : x));
    } catch (e) {
      /* the toast said it worked; the list shows the mark on the next refresh */
    }
  }

  function marks(item) {
    const list = Array.isArray(item.resubmitted) ? item.resubmitted : [];
    if (!list.length) return null;
    return h("div", { class: "dlq-resubmitted muted" },
      h("span", {}, t("dlq.resubmitted_label", { n: list.length })),
      ...list.map((m) => h("span", { class: "dlq-mark" },
        h("a", { class: "mono", href: runHref(asText(m.run_id)), title: asText(m.run_id) }, asText(m.run_id)),
        m.at ? h("span", {}, " · ", relTime(m.at)) : null,
        h("span", {}, " · " + (m.key_id ? t("dlq.by_key", { key: asText(m.key_id) }) : t("dlq.by_no_key"))))));
  }

  function confirmDrop(item) {
    $("dlq-drop-what").textContent = "#" + item.id + " · " + (item.reason || "") + (item.run_id ? " · " + item.run_id : "");
    dialog.returnValue = "";
    dialog.onclose = async () => {
      if (dialog.returnValue !== "yes") return;
      state.busy.add(item.id);
      render();
      try {
        await api("/dlq/" + encodeURIComponent(item.id), { method: "DELETE" });
        state.items = state.items.filter((x) => x.id !== item.id);
        if (state.open === item.id) state.open = null;
        toast(t("dlq.dropped"), "ok");
      } catch (e) {
        toast(e instanceof ApiError ? e.describe() : String(e), "error");
      } finally {
        state.busy.delete(item.id);
        render();
      }
    };
    dialog.showModal();
    $("dlq-drop-no").focus();
  }

  function row(item) {
    const busy = state.busy.has(item.id);
    const when = item.timestamp || item.stored_at;
    const newRun = state.resubmitted && state.resubmitted[item.id];
    return h("div", { class: "dlq-item" + (state.open === item.id ? " open" : ""), role: "listitem", dataset: { dlqId: String(item.id) } },
      h("div", { class: "dlq-row" },
        h("button", { type: "button", class: "btn btn-link dlq-toggle", "aria-expanded": String(state.open === item.id), onclick: () => toggle(item) },
          h("span", { class: "mono" }, "#" + item.id)),
        h("span", { class: "chip dlq-reason" }, item.reason || ""),
        item.run_id ? h("a", { class: "mono dlq-run", href: runHref(item.run_id), title: item.run_id }, item.run_id) : h("span", { class: "muted" }, t("dlq.no_run")),
        h("strong", { class: "dlq-flow" }, item.flow_name || ""),
        h("span", { class: "muted num", title: when ? fmtAbsolute(when) : "" }, when ? relTime(when) : ""),
        h("span", { class: "muted num" }, t("dlq.bytes", { n: item.size ?? 0 })),
        h("span", { class: "dlq-actions" },
          newRun ? h("a", { class: "btn btn-link", href: runHref(newRun) }, t("dlq.new_run")) : null,
          h("button", { type: "button", class: "btn", disabled: busy || !item.run_id, title: item.run_id ? "" : t("dlq.no_run"), onclick: () => resubmit(item) }, t("dlq.resubmit")),
          h("button", { type: "button", class: "btn btn-danger", disabled: busy, onclick: () => confirmDrop(item) }, t("dlq.drop")))),
      marks(item),
      item.error ? h("div", { class: "c-error dlq-error", title: asText(item.error) }, asText(item.error)) : null,
      state.open === item.id ? h("pre", { class: "mono dlq-payload" },
        state.openBody === null ? t("runs.loading") : state.openBody.failed ? state.openBody.failed : prettyJson(state.openBody.body ?? state.openBody.raw)) : null);
  }

  function render() {
    if (ui.route.view !== "dlq") return;
    const list = $("dlq-list");
    clear(list);
    for (const item of state.items) list.appendChild(row(item));
    const empty = $("dlq-empty");
    empty.hidden = state.items.length > 0;
    empty.textContent = state.error ? (state.error instanceof ApiError ? state.error.describe() : String(state.error)) : state.loaded ? t("dlq.empty") : t("runs.loading");
    $("dlq-more").hidden = !state.cursor;
    $("dlq-more").disabled = state.loading;
    $("dlq-count").textContent = state.loaded ? t("dlq.count", { shown: state.items.length, total: state.total ?? state.items.length }) : "";
  }

  $("dlq-refresh").addEventListener("click", () => load(false));
  $("dlq-more").addEventListener("click", () => load(true));
  ui.registerView("dlq", {
    render,
    shown(visible) {
      tab.setAttribute("aria-current", visible ? "page" : "false");
      if (visible && !state.loading) load(false);
    },
  });
});
