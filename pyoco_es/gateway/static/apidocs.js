/* /docs and /redoc: render the gateway's own /openapi.json (operations, parameters, request
 * bodies, responses, schemas).  No network access beyond this server, no innerHTML: every text
 * from the document reaches the page through textContent.
 */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LAYOUT = document.documentElement.getAttribute("data-layout") === "redoc" ? "redoc" : "docs";
  const METHODS = ["get", "post", "put", "patch", "delete"];

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const opId = (method, path) => "op-" + method + "-" + path.replace(/[^A-Za-z0-9]+/g, "-");
  const refName = (ref) => (typeof ref === "string" && ref.startsWith("#/components/schemas/") ? ref.slice(21) : null);

  /** A schema as compact text, with $refs as links to the schema list. */
  function schemaNode(schema, depth) {
    depth = depth || 0;
    const out = h("span");
    if (!schema || typeof schema !== "object") return out;
    const ref = refName(schema.$ref);
    if (ref) {
      out.appendChild(h("a", { class: "ad-ref", href: "#schema-" + ref }, ref));
      return out;
    }
    for (const key of ["oneOf", "anyOf", "allOf"]) {
      if (Array.isArray(schema[key])) {
        schema[key].forEach((s, i) => {
          if (i) out.appendChild(document.createTextNode(key === "allOf" ? " & " : " | "));
          out.appendChild(schemaNode(s, depth + 1));
        });
        return out;
      }
    }
    const type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
    if (type === "array") {
      out.append("array of ", schemaNode(schema.items, depth + 1));
    } else if (type === "object" && schema.properties && depth < 4) {
      const required = new Set(schema.required || []);
      out.append("{");
      for (const [name, sub] of Object.entries(schema.properties)) {
        out.append("\n" + "  ".repeat(depth + 1) + name + (required.has(name) ? "*" : "") + ": ");
        out.appendChild(schemaNode(sub, depth + 1));
      }
      out.append("\n" + "  ".repeat(depth) + "}");
    } else {
      out.append(type);
    }
    const facts = [];
    for (const k of ["enum", "minimum", "maximum", "minLength", "maxLength", "maxItems", "pattern", "default", "format"]) {
      if (schema[k] !== undefined) facts.push(k + "=" + JSON.stringify(schema[k]));
    }
    if (facts.length) out.append(" (" + facts.join(", ") + ")");
    if (schema.description && depth > 0) out.append("  // " + schema.description);
    return out;
  }

  function contentTable(content) {
    const table = h("table", { class: "ad-table" }, h("tr", null, h("th", null, "media type"), h("th", null, "schema")));
    for (const [media, body] of Object.entries(content || {})) {
      table.appendChild(h("tr", null, h("td", null, h("code", null, media)), h("td", null, h("pre", { class: "ad-schema" }, schemaNode(body.schema)))));
    }
    return table;
  }

  /** The header names an operation's security requirement asks for (apiKey schemes). */
  function keyHeaders(op, schemes) {
    const out = [];
    for (const req of op.security || []) {
      for (const name of Object.keys(req || {})) {
        const s = schemes[name];
        if (s && s.type === "apiKey" && typeof s.name === "string") out.push(s.name);
      }
    }
    return out;
  }

  function operation(path, method, op, schemes) {
    const detail = h("div", { class: "ad-detail" });
    const params = op.parameters || [];
    if (params.length) {
      const table = h("table", { class: "ad-table" }, h("tr", null, h("th", null, "name"), h("th", null, "in"), h("th", null, "schema"), h("th", null, "description")));
      for (const p of params) {
        table.appendChild(h("tr", { dataset: { param: p.name } },
          h("td", null, h("code", null, p.name), p.required ? h("span", { class: "ad-req" }, "required") : null),
          h("td", null, p.in),
          h("td", null, h("pre", { class: "ad-schema" }, schemaNode(p.schema))),
          h("td", null, p.description || "")));
      }
      detail.append(h("h3", null, "Parameters"), table);
    }
    if (op.requestBody) detail.append(h("h3", null, "Request body"), contentTable(op.requestBody.content));
    const responses = h("table", { class: "ad-table" }, h("tr", null, h("th", null, "status"), h("th", null, "description"), h("th", null, "body")));
    for (const [code, r] of Object.entries(op.responses || {})) {
      const bodies = Object.entries(r.content || {}).map(([media, c]) => h("div", null, h("code", null, media), " ", h("pre", { class: "ad-schema" }, schemaNode(c.schema))));
      responses.appendChild(h("tr", { dataset: { status: code } }, h("td", null, h("code", null, code)), h("td", null, r.description || ""), h("td", null, bodies)));
    }
    detail.append(h("h3", null, "Responses"), responses);
    const summary = h("summary", null, h("span", { class: "ad-method", dataset: { method } }, method.toUpperCase()),
      h("span", { class: "ad-path" }, path),
      ...keyHeaders(op, schemes).map((name) => h("span", { class: "ad-key", title: "needs an API key in this header" }, name)),
      h("span", { class: "ad-summary" }, op.summary || ""));
    const el = h("details", { class: "ad-op", id: opId(method, path), dataset: { method, path } }, summary, detail);
    if (LAYOUT === "redoc") el.open = true;
    return el;
  }

  function render(doc) {
    const info = doc.info || {};
    $("ad-title").textContent = info.title || "API";
    $("ad-version").textContent = info.version ? "v" + info.version : "";
    $("ad-description").textContent = info.description || "";
    document.title = (info.title || "API") + (LAYOUT === "redoc" ? " (redoc)" : " (docs)");
    const ops = $("ad-ops");
    const nav = $("ad-nav");
    for (const path of Object.keys(doc.paths || {}).sort()) {
      for (const method of METHODS) {
        const op = doc.paths[path][method];
        if (!op) continue;
        ops.appendChild(operation(path, method, op, (doc.components && doc.components.securitySchemes) || {}));
        nav.appendChild(h("a", { href: "#" + opId(method, path), dataset: { method, path } }, method.toUpperCase() + " " + path));
      }
    }
    const schemas = (doc.components && doc.components.schemas) || {};
    const section = $("ad-schemas");
    if (Object.keys(schemas).length) section.appendChild(h("h2", null, "Schemas"));
    for (const [name, schema] of Object.entries(schemas)) {
      section.appendChild(h("div", { class: "ad-schema-card", id: "schema-" + name }, h("strong", null, name), h("pre", { class: "ad-schema" }, schemaNode(schema))));
    }
  }

  function filter(text) {
    const q = text.trim().toLowerCase();
    for (const el of document.querySelectorAll("[data-path]")) {
      const hay = (el.dataset.method + " " + el.dataset.path + " " + el.textContent).toLowerCase();
      el.hidden = q !== "" && !hay.includes(q);
    }
  }

  async function load() {
    try {
      const res = await fetch("/openapi.json", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!res.ok) throw new Error("GET /openapi.json answered " + res.status);
      render(await res.json());
      document.documentElement.dataset.loaded = "1";
    } catch (e) {
      $("ad-error").hidden = false;
      $("ad-error").textContent = "Could not load the API description: " + String(e && e.message ? e.message : e);
    }
  }

  $("ad-filter").addEventListener("input", (e) => filter(e.target.value));
  load();
})();
