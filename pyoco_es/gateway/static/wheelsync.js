/* pyoco-es dashboard: wheel sync (issue 14). A worker card's "Wheel sync" rows (installed
 * versions, skipped and failed wheels, last sync) and a run's code (the wheels its attempt's
 * process imported, from run.claimed / the snapshot's `wheels`).
 *
 * app.js calls window.PyocoWheelSync.* with its own helpers (ui = {h, t, kv, relTime}); like
 * app.js, server text only ever reaches the page as text nodes or inert attributes.
 */
"use strict";

window.PyocoWheelSync = (() => {
  const MAX_SHOWN = 8;
  const list = (v) => (Array.isArray(v) ? v.filter((x) => x && typeof x === "object") : []);
  const sha8 = (s) => (typeof s === "string" ? s.slice(0, 8) : "");

  /** "name version" chips, the sha256 prefix and wheel file name in the title. */
  function wheelChips(items, ui, nameKey, versionKey) {
    const shown = items.slice(0, MAX_SHOWN).map((w) => ui.h("span", {
      class: "chip mono wsync-wheel",
      title: [w.wheel_name, w.sha256_hex || w.sha256 ? "sha256 " + (w.sha256_hex || w.sha256) : ""].filter(Boolean).join("\n"),
    }, String(w[nameKey] || "?") + " " + String(w[versionKey] || "?")));
    if (items.length > MAX_SHOWN) shown.push(ui.h("span", { class: "muted" }, "+" + (items.length - MAX_SHOWN)));
    return ui.h("span", { class: "wsync-wheels" }, shown);
  }

  /** The kv rows a worker card shows for its wheel_sync record (none when sync is off). */
  function workerKvs(w, ui) {
    const s = w && w.wheel_sync;
    if (!s || typeof s !== "object" || !s.enabled) return null;
    const installed = list(s.installed_wheels);
    const failed = list(s.failed_wheels);
    const result = String(s.last_result || "idle");
    const rows = [
      ui.kv(ui.t("wsync.title"), ui.h("span", { class: "wsync-state", dataset: { result } },
        ui.h("span", { class: result === "error" ? "warn" : "" }, ui.t("wsync.result_" + (["ok", "error", "idle"].includes(result) ? result : "idle"))),
        s.last_attempt_at ? ui.h("span", { class: "muted" }, " · ", ui.relTime(s.last_attempt_at)) : null)),
      ui.kv(ui.t("wsync.installed"), installed.length
        ? wheelChips(installed, ui, "package_name", "package_version")
        : ui.h("span", { class: "muted" }, ui.t("wsync.none"))),
    ];
    const skipped = Number(s.skipped_incompatible_count) || 0;
    if (skipped) {
      rows.push(ui.kv(ui.t("wsync.skipped"), ui.h("span", { class: "muted", title: list(s.skipped_incompatible).map((x) => x.wheel_name).join("\n") },
        ui.t("wsync.skipped_n", { n: skipped }))));
    }
    if (failed.length) {
      rows.push(ui.kv(ui.t("wsync.failed"), ui.h("div", { class: "wsync-failed" }, failed.slice(0, MAX_SHOWN).map((f) =>
        ui.h("details", { class: "wsync-failure" },
          ui.h("summary", { class: "warn mono" }, String(f.wheel_name || "?")),
          ui.h("pre", { class: "pre small" }, String(f.error || "").slice(0, 2000)))))));
    } else if (result === "error" && s.last_error) {
      rows.push(ui.kv(ui.t("wsync.failed"), ui.h("span", { class: "warn small" }, String(s.last_error).slice(0, 300))));
    }
    return rows;
  }

  /** A run's code: its attempt's wheels as chips (null without any). */
  function runCode(wheels, ui) {
    const items = list(wheels);
    return items.length ? wheelChips(items, ui, "name", "version") : null;
  }

  /** The run.claimed timeline line's suffix: " · code: a 1.0 (1a2b3c4d), ...". */
  function claimedSuffix(d) {
    const items = list(d && d.wheels);
    if (!items.length) return "";
    return " · " + items.map((w) => String(w.name || "?") + " " + String(w.version || "?") + " (" + sha8(w.sha256) + ")").join(", ");
  }

  return { workerKvs, runCode, claimedSuffix };
})();
