/* pyoco-es dashboard: select many runs in the runs list and cancel them (issue 18).
 *
 * Each PENDING or RUNNING row gets a check box; a bar shows how many are selected, "Select all
 * shown" and "Cancel selected", which asks for confirmation and sends one POST /runs/cancel
 * {"run_ids": [...]} per 1000 runs (the normal cancel of each run, server side).  Server text
 * reaches the page only through textContent, as in app.js.
 */
"use strict";

(window.pyocoExtensions = window.pyocoExtensions || []).push((ui) => {
  const { $, h, t, api, ApiError, toast, noteError } = ui;
  const CHUNK = 1000;
  const CANCELLABLE = new Set(["PENDING", "RUNNING"]);
  const selected = new Set();
  let busy = false;

  const bar = h("div", { class: "bulk-bar", id: "bulk-bar", hidden: true, role: "region", "aria-live": "polite" },
    h("span", { id: "bulk-count" }),
    h("button", { type: "button", class: "btn btn-link", id: "bulk-all" }, ""),
    h("button", { type: "button", class: "btn btn-link", id: "bulk-clear" }, ""),
    h("span", { class: "spacer" }),
    h("button", { type: "button", class: "btn btn-danger", id: "bulk-cancel" }, ""));
  $("view-runs").appendChild(bar);
  const dialog = h("dialog", { id: "bulk-dialog", class: "dialog" },
    h("form", { method: "dialog" },
      h("h2", { id: "bulk-dialog-title" }),
      h("p", { class: "muted", dataset: { i18n: "detail.cancel_confirm_body" } }),
      h("div", { class: "dialog-actions" }, h("span", { class: "spacer" }),
        h("button", { type: "submit", class: "btn", value: "no", id: "bulk-no", dataset: { i18n: "detail.cancel_confirm_no" } }, "Keep running"),
        h("button", { type: "submit", class: "btn btn-danger", value: "yes", id: "bulk-yes", dataset: { i18n: "bulk.confirm_yes" } }, "Cancel them"))));
  document.body.appendChild(dialog);

  let barQueued = false;
  function queueBar() {
    if (barQueued) return;
    barQueued = true;
    queueMicrotask(() => { barQueued = false; renderBar(); });
  }

  function renderBar() {
    bar.hidden = selected.size === 0 && !ui.visibleRuns().some((r) => CANCELLABLE.has(r.status));
    $("bulk-count").textContent = t("bulk.selected", { n: selected.size });
    $("bulk-all").textContent = t("bulk.select_all");
    $("bulk-clear").textContent = t("bulk.clear");
    $("bulk-cancel").textContent = busy ? t("detail.cancelling") : t("bulk.cancel", { n: selected.size });
    $("bulk-cancel").disabled = busy || selected.size === 0;
  }

  function setBox(box, on) {
    box.setAttribute("aria-checked", String(on));
    box.classList.toggle("on", on);
  }

  ui.onRunRow((row, run) => {
    queueBar();
    if (!CANCELLABLE.has(run.status)) {
      selected.delete(run.run_id);
      return row;
    }
    const box = h("span", { class: "sel-box", role: "checkbox", tabindex: "0", "aria-label": t("bulk.select_run"), dataset: { runId: run.run_id } });
    setBox(box, selected.has(run.run_id));
    const flip = (e) => {
      e.preventDefault(); // the row is a link: a click on the box must not open the run
      e.stopPropagation();
      if (selected.has(run.run_id)) selected.delete(run.run_id);
      else selected.add(run.run_id);
      setBox(box, selected.has(run.run_id));
      renderBar();
    };
    box.addEventListener("click", flip);
    box.addEventListener("keydown", (e) => { if (e.key === " " || e.key === "Enter") flip(e); });
    const status = row.querySelector(".c-status");
    if (status) status.insertBefore(box, status.firstChild);
    return row;
  });

  async function cancelSelected() {
    const ids = [...selected];
    busy = true;
    renderBar();
    let asked = 0;
    let ended = 0;
    try {
      for (let i = 0; i < ids.length; i += CHUNK) {
        const res = await api("/runs/cancel", { method: "POST", json: { run_ids: ids.slice(i, i + CHUNK) } });
        asked += (res.cancel_requested || []).length;
        ended += (res.already_terminal || []).length + (res.already_cancelling || []).length;
      }
      selected.clear();
      toast(t("bulk.done", { asked, ended }), "ok");
    } catch (e) {
      noteError(e);
      toast(e instanceof ApiError ? e.describe() : String(e), "error");
    } finally {
      busy = false;
      ui.rerenderRuns();
      renderBar();
    }
  }

  $("bulk-all").addEventListener("click", () => {
    for (const run of ui.visibleRuns()) if (CANCELLABLE.has(run.status)) selected.add(run.run_id);
    ui.rerenderRuns();
    renderBar();
  });
  $("bulk-clear").addEventListener("click", () => {
    selected.clear();
    ui.rerenderRuns();
    renderBar();
  });
  $("bulk-cancel").addEventListener("click", () => {
    $("bulk-dialog-title").textContent = t("bulk.confirm_title", { n: selected.size });
    dialog.returnValue = "";
    dialog.onclose = () => { if (dialog.returnValue === "yes") cancelSelected(); };
    dialog.showModal();
    $("bulk-no").focus();
  });
});
