/* pyoco-es dashboard: the API-key state next to the key button (issue 13).
 *
 * Asks GET /auth/whoami with the stored key and shows what the gateway said:
 *   - auth off (auth_mode "none"): nothing is shown;
 *   - 401: "API key required" (no key, or the gateway wants one);
 *   - 403: "API key refused" (wrong, unknown or revoked key);
 *   - 200 with a tenant: "Tenant <id>".
 * app.js calls window.pyocoAuthState.check() when the key changes and when a request is refused;
 * the first check runs at load.  Server text reaches the page only through textContent.
 */
"use strict";

(() => {
  const STRINGS = window.PYOCO_I18N || { en: {} };
  const MIN_GAP_MS = 2000; // refusals seen elsewhere re-check at most this often
  let inFlight = null;
  let lastAt = 0;

  const $ = (id) => document.getElementById(id);
  function stored(name, fallback) {
    try {
      const v = localStorage.getItem(name);
      return v === null ? fallback : v;
    } catch (_) {
      return fallback;
    }
  }
  function t(key) {
    const lang = document.documentElement.lang === "ja" ? "ja" : "en";
    const table = STRINGS[lang] || {};
    return key in table ? table[key] : key in STRINGS.en ? STRINGS.en[key] : key;
  }

  /** Show one state: "off" and "unknown" hide the badge; the label is re-translated by
   * app.js's applyStaticI18n (data-i18n) when the language changes. */
  function show(state, tenant) {
    const badge = $("auth-state");
    if (!badge) return;
    badge.dataset.state = state;
    badge.hidden = state === "off" || state === "unknown";
    const label = $("auth-state-text");
    const key = state === "ok" ? "auth.state_tenant" : state === "refused" ? "auth.state_refused" : "auth.state_required";
    label.dataset.i18n = key;
    label.textContent = t(key);
    $("auth-state-tenant").textContent = state === "ok" ? String(tenant ?? "") : "";
    badge.title = state === "ok" ? t("auth.state_tenant_title") : t("auth.state_fix");
  }

  async function ask() {
    const key = stored("pyoco.auth_key", "");
    const name = stored("pyoco.auth_header", "X-API-Key") || "X-API-Key";
    const headers = { Accept: "application/json" };
    if (key) headers[name] = key;
    let res;
    try {
      res = await fetch("/auth/whoami", { headers, cache: "no-store" });
    } catch (_) {
      return show("unknown");
    }
    if (res.status === 401) return show("required");
    if (res.status === 403) return show("refused");
    if (!res.ok) return show("unknown");
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    if (!body || body.auth_mode !== "api_key") return show("off");
    show("ok", body.tenant_id);
  }

  /** Re-ask the gateway; `force` skips the rate limit (the key was just changed). */
  function check(force) {
    const now = Date.now();
    if (inFlight || (!force && now - lastAt < MIN_GAP_MS)) return inFlight;
    lastAt = now;
    inFlight = ask().finally(() => { inFlight = null; });
    return inFlight;
  }

  function setup() {
    const badge = $("auth-state");
    if (badge) badge.addEventListener("click", () => $("auth-open").click());
    check(true);
  }

  window.pyocoAuthState = {
    check,
    get state() { const b = $("auth-state"); return b ? b.dataset.state : "unknown"; },
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
