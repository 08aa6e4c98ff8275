// meshgate's dashboard: reads /ui/api/state and /ui/events (docs/dashboard-api.md)
// and draws the mesh. Plain JS, no build step; Cytoscape.js is vendored.
(function () {
  "use strict";

  const here = document.currentScript ? document.currentScript.src : location.href;
  const BASE = new URL(".", here); // the directory that serves app.js: /ui/
  const params = new URLSearchParams(location.search);
  // Off loopback the API needs the admin token: open the page as /ui#token=...
  // (a fragment is never sent to a server); it is kept for this tab only.
  const TOKEN = (function () {
    const frag = new URLSearchParams(location.hash.slice(1));
    const given = frag.get("token") || params.get("token");
    try {
      if (given) sessionStorage.setItem("meshgate-token", given);
      if (frag.has("token")) history.replaceState(null, "", location.pathname + location.search);
      return given || sessionStorage.getItem("meshgate-token");
    } catch (err) {
      return given;
    }
  })();

  let state = null;
  let cy = null;
  let selected = params.get("service");
  let source = null;
  let retry = 1000;
  let updates = 0;
  const RETRY_MAX = 15000;
  const DENIALS_SHOWN = 10;

  // --- small helpers -------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function fill(tbody, rows, empty, cols) {
    tbody.replaceChildren(
      ...(rows.length ? rows : [h("tr", { class: "empty" }, h("td", { colspan: cols, text: empty }))])
    );
  }

  function num(x) {
    return typeof x === "number" && isFinite(x);
  }

  function fmtRps(x) {
    if (!num(x)) return "—";
    if (x === 0) return "0";
    if (x < 1) return x.toFixed(2);
    if (x < 100) return x.toFixed(1);
    return x.toFixed(0);
  }

  function fmtPct(x) {
    if (!num(x)) return "—";
    return (x * 100).toFixed(x >= 0.9995 || x === 0 ? 0 : 1) + "%";
  }

  function fmtShare(x) {
    return num(x) ? (x * 100).toFixed(1) + "%" : "—";
  }

  function fmtMs(x) {
    if (!num(x)) return "—";
    return (x < 10 ? x.toFixed(1) : x.toFixed(0)) + " ms";
  }

  function fmtTime(t) {
    if (!num(t)) return "—";
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  function fmtDate(t) {
    if (!num(t)) return "—";
    const d = new Date(t * 1000);
    return d.toISOString().replace("T", " ").slice(0, 16) + " UTC";
  }

  function fmtIn(t) {
    if (!num(t)) return "";
    const s = t - Date.now() / 1000;
    const a = Math.abs(s);
    const txt = a < 90 ? Math.round(a) + " s" : a < 5400 ? Math.round(a / 60) + " min"
      : a < 172800 ? Math.round(a / 3600) + " h" : Math.round(a / 86400) + " d";
    return s >= 0 ? "in " + txt : txt + " ago";
  }

  function successClass(x) {
    if (!num(x)) return "idle";
    if (x >= 0.99) return "ok";
    if (x >= 0.95) return "warn";
    return "bad";
  }

  function badge(cls, text) {
    return h("span", { class: "badge " + cls, text });
  }

  function api(path) {
    const url = new URL(path, BASE);
    const headers = { Accept: "application/json" };
    if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
    return fetch(url, { headers, cache: "no-store" }).then(async (r) => {
      const body = await r.json().catch(() => null);
      if (!r.ok) {
        const why = body && (body.detail || body.error || body.title);
        throw new Error(why ? r.status + ": " + why : "HTTP " + r.status);
      }
      return body;
    });
  }

  function palette() {
    const css = getComputedStyle(document.documentElement);
    const v = (n) => css.getPropertyValue(n).trim();
    return {
      text: v("--text"), card: v("--card"), muted: v("--muted"), border: v("--border"),
      ok: v("--ok"), warn: v("--warn"), bad: v("--bad"), idle: v("--idle"),
      node: v("--node"), gateway: v("--gateway"), external: v("--external"), accent: v("--accent"),
    };
  }

  const ICONS = {
    lock: "M5 7V5a3 3 0 0 1 6 0v2h1a1 1 0 0 1 1 1v6a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V8a1 1 0 0 1 1-1zm1.5 0h3V5a1.5 1.5 0 0 0-3 0z",
    warn: "M8 1.2 15.3 14.6H.7zM7.2 6h1.6v4.6H7.2zm0 5.8h1.6v1.6H7.2z",
  };

  function icon(kind, label) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "ico " + kind);
    svg.setAttribute("viewBox", "0 0 16 16");
    if (label) {
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", label);
    } else svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("fill-rule", "evenodd");
    path.setAttribute("d", ICONS[kind]);
    svg.append(path);
    return svg;
  }

  // --- the graph -----------------------------------------------------------

  function nodeLabel(n) {
    let label = n.name || n.id;
    if (n.mtls === "permissive" || n.mtls === "none") label = "⚠ " + label;
    if (n.kind === "service" && num(n.instances)) {
      label += "\n" + (num(n.instances_up) ? n.instances_up : "?") + "/" + n.instances + " up";
    }
    return label;
  }

  function plaintextWarned(e, kinds) {
    // Plain HTTP from clients to the gateway is the edge; inside the mesh it is a warning.
    return !e.mtls && kinds.get(e.target) !== "gateway";
  }

  function edgeLabel(e, kinds) {
    // The padlock and the warning are icons drawn over the graph (placeMarks).
    if (e.denied) return "⊘ denied " + fmtRps(e.rps) + " rps";
    return fmtRps(e.rps) + " rps · p99 " + fmtMs(e.p99_ms);
  }

  function denialFor(e) {
    const ds = (state && state.denials) || [];
    const own = ds.find((d) => d.source === e.source && d.destination === e.target);
    if (e.policy) return { policy: e.policy, why: own ? (own.rule ? "rule " + own.rule : own.reason || "denied") : "denied by its rules" };
    const hit = ds.find((d) => d.source === e.source && d.destination === e.target)
      || ds.find((d) => d.destination === e.target);
    if (hit) {
      return { policy: hit.policy, why: hit.rule ? "rule " + hit.rule : hit.reason || "denied" };
    }
    const svc = state && state.services && state.services[e.target];
    const pol = svc && (svc.policies || []).find((p) => p.deny > 0);
    if (pol) return { policy: pol.policy, why: pol.rule === "(default)" ? "no rule allowed it" : "rule " + pol.rule };
    return { policy: "inbound/" + e.target, why: "denied by policy" };
  }

  function explainEdge(e) {
    if (!e.denied) return "";
    const d = denialFor(e);
    return "denied by " + d.policy + " (" + d.why + ")";
  }

  function graphElements(st) {
    const kinds = new Map(st.nodes.map((n) => [n.id, n.kind]));
    const nodes = st.nodes.map((n) => ({
      group: "nodes",
      data: {
        id: n.id, name: n.name || n.id, kind: n.kind || "service", health: n.health || "unknown",
        mtls: n.mtls || "", label: nodeLabel(n),
      },
    }));
    for (const e of st.edges) {
      for (const end of [e.source, e.target]) {
        if (!kinds.has(end)) {
          kinds.set(end, "unknown");
          nodes.push({ group: "nodes", data: { id: end, name: end, kind: "unknown", health: "unknown", mtls: "", label: end } });
        }
      }
    }
    const max = Math.max(1e-9, ...st.edges.map((e) => (num(e.rps) ? e.rps : 0)));
    const edges = st.edges.map((e) => ({
      group: "edges",
      data: {
        id: e.id, source: e.source, target: e.target, rps: num(e.rps) ? e.rps : 0,
        success: num(e.success) ? e.success : -1, p99: num(e.p99_ms) ? e.p99_ms : -1,
        mtls: !!e.mtls, denied: !!e.denied,
        tone: e.denied ? "denied" : num(e.rps) && e.rps > 0 ? successClass(e.success) : "idle",
        width: 1.5 + 8 * Math.sqrt((num(e.rps) ? e.rps : 0) / max),
        label: edgeLabel(e, kinds), explanation: explainEdge(e), arc: arcs.get(e.id) || ARC,
        warn: plaintextWarned(e, kinds),
      },
    }));
    return { nodes, edges };
  }

  function graphStyle() {
    const p = palette();
    return [
      { selector: "node", style: {
        label: "data(label)", "text-wrap": "wrap", "text-valign": "bottom", "text-margin-y": 6,
        "font-size": 12, color: p.text, "text-background-color": p.card, "text-background-opacity": 0.85,
        "text-background-padding": 2, "background-color": p.node, "border-width": 2, "border-color": p.border,
        width: 34, height: 34,
      } },
      { selector: "node[kind = 'gateway']", style: { shape: "round-hexagon", "background-color": p.gateway, width: 44, height: 44 } },
      { selector: "node[kind = 'external']", style: { shape: "round-rectangle", "background-color": p.external } },
      { selector: "node[kind = 'unknown']", style: { shape: "round-diamond", "background-color": p.idle } },
      { selector: "node[health = 'degraded']", style: { "background-color": p.warn, "border-color": p.warn } },
      { selector: "node[health = 'down']", style: { "background-color": p.bad, "border-color": p.bad, "border-width": 4 } },
      { selector: "node:selected", style: { "border-color": p.accent, "border-width": 4 } },
      { selector: "edge", style: {
        width: "data(width)", "curve-style": "bezier", "target-arrow-shape": "triangle",
        "arrow-scale": 0.9, label: "data(label)", "font-size": 11, color: p.text,
        "text-background-color": p.card, "text-background-opacity": 0.85, "text-background-padding": 2,
        "text-rotation": "autorotate", "line-color": p.idle, "target-arrow-color": p.idle,
      } },
      { selector: "edge[tone = 'ok']", style: { "line-color": p.ok, "target-arrow-color": p.ok } },
      { selector: "edge[tone = 'warn']", style: { "line-color": p.warn, "target-arrow-color": p.warn } },
      { selector: "edge[tone = 'bad']", style: { "line-color": p.bad, "target-arrow-color": p.bad } },
      { selector: "edge[?denied]", style: {
        "line-style": "dashed", "line-dash-pattern": [8, 5], "line-color": p.bad,
        "target-arrow-color": p.bad, "target-arrow-shape": "tee",
        // An arc of its own, off the allowed calls' straight lines.
        "curve-style": "unbundled-bezier", "control-point-distances": "data(arc)", "control-point-weights": 0.5,
      } },
      { selector: "edge:selected", style: { "overlay-opacity": 0.15, "overlay-color": p.accent } },
    ];
  }

  function initGraph() {
    if (cy || typeof window.cytoscape !== "function") return cy;
    cy = window.cytoscape({
      container: $("graph"),
      style: graphStyle(),
      wheelSensitivity: 0.3,
      minZoom: 0.3,
      maxZoom: 3,
      boxSelectionEnabled: false,
    });
    window.meshgateGraph = cy;
    cy.on("tap", "node", (ev) => {
      const n = ev.target;
      if (state && state.services && state.services[n.id()]) selectService(n.id());
      $("graph-detail").textContent = n.data("name") + ": " + n.data("kind") + ", health " + n.data("health");
    });
    cy.on("dragfree", "node", () => bendDenied());
    cy.on("tap", "edge", (ev) => {
      const e = ev.target.data();
      const what = e.denied ? e.explanation : (e.mtls ? "mutual TLS" : "plaintext") + ", success "
        + fmtPct(e.success >= 0 ? e.success : null) + ", p99 " + fmtMs(e.p99 >= 0 ? e.p99 : null);
      $("graph-detail").textContent = e.source + " → " + e.target + ": " + fmtRps(e.rps) + " rps, " + what;
    });
    let queued = false;
    cy.on("render", () => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        placeMarks();
      });
    });
    if (window.ResizeObserver) new ResizeObserver(() => cy.resize()).observe($("graph"));
    const scheme = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)");
    if (scheme && scheme.addEventListener) scheme.addEventListener("change", () => cy.style(graphStyle()));
    return cy;
  }

  function placeMarks() {
    // A padlock on each mTLS edge, a warning on each plaintext hop in the mesh.
    const layer = $("graph-marks");
    const have = new Map([...layer.children].map((c) => [c.getAttribute("data-edge-id"), c]));
    const want = cy.edges().filter((e) => e.data("mtls") || e.data("warn"));
    const ids = new Set(want.map((e) => e.id()));
    for (const [id, c] of have) if (!ids.has(id)) c.remove();
    want.forEach((e) => {
      const kind = e.data("mtls") ? "lock" : "warn";
      let m = have.get(e.id());
      if (!m || m.getAttribute("data-kind") !== kind) {
        if (m) m.remove();
        m = h("span", { class: "mark " + kind, "data-edge-id": e.id(), "data-kind": kind }, icon(kind));
        layer.append(m);
      }
      // Just before the label (which sits at the middle, along the edge).
      const s = e.source().renderedPosition();
      const mid = e.renderedMidpoint();
      const len = Math.hypot(s.x - mid.x, s.y - mid.y) || 1;
      const half = (String(e.data("label")).length * 3.3 + 14) * cy.zoom();
      const d = Math.max(0, Math.min(half, len - 26 * cy.zoom()));
      const x = mid.x + ((s.x - mid.x) / len) * d;
      const y = mid.y + ((s.y - mid.y) / len) * d;
      m.style.transform = "translate(" + (x - 9).toFixed(1) + "px, " + (y - 9).toFixed(1) + "px)";
    });
  }

  const ARC = 70;
  const arcs = new Map(); // a denied edge's bend, chosen by bendDenied

  function bendDenied() {
    // A denied edge bends off the straight line, to the side (and as far)
    // that keeps its curve clear of other nodes.
    cy.edges("[?denied]").forEach((e) => {
      const s = e.source().position();
      const t = e.target().position();
      const len = Math.hypot(t.x - s.x, t.y - s.y) || 1;
      const nx = -(t.y - s.y) / len;
      const ny = (t.x - s.x) / len;
      const others = cy.nodes().filter((n) => n !== e.source() && n !== e.target()).map((n) => n.position());
      const clearance = (d) => {
        let best = Infinity;
        for (let i = 1; i < 20; i++) {
          const u = i / 20;
          // The quadratic curve through a control point d off the middle.
          const cx = (s.x + t.x) / 2 + nx * d;
          const cy2 = (s.y + t.y) / 2 + ny * d;
          const x = (1 - u) * (1 - u) * s.x + 2 * u * (1 - u) * cx + u * u * t.x;
          const y = (1 - u) * (1 - u) * s.y + 2 * u * (1 - u) * cy2 + u * u * t.y;
          for (const o of others) best = Math.min(best, Math.hypot(o.x - x, o.y - y));
        }
        return best;
      };
      let pick = ARC;
      let room = -1;
      for (const d of [ARC, -ARC, 2 * ARC, -2 * ARC, 3 * ARC, -3 * ARC]) {
        const c = clearance(d);
        if (c > room + 1) {
          pick = d;
          room = c;
        }
        if (c >= 45) break;
      }
      arcs.set(e.id(), pick);
      e.data("arc", pick);
    });
  }

  const COL = 230;
  const ROW = 105;

  function layered() {
    // Columns by call depth (the longest path from a caller nobody calls: the
    // clients, callers without an identity), left to right; rows in a column
    // follow their callers' rows. An edge that closes a cycle is ignored.
    const ids = cy.nodes().map((n) => n.id());
    const preds = new Map(ids.map((i) => [i, new Set()]));
    cy.edges().forEach((e) => {
      if (e.source().id() !== e.target().id()) preds.get(e.target().id()).add(e.source().id());
    });
    const depth = new Map();
    const left = new Set(ids);
    while (left.size) {
      let ready = [...left].filter((i) => [...preds.get(i)].every((p) => !left.has(p)));
      if (!ready.length) {
        // A cycle: take the node with the fewest callers still waiting.
        const waiting = (i) => [...preds.get(i)].filter((p) => left.has(p)).length;
        ready = [[...left].sort((a, b) => waiting(a) - waiting(b) || a.localeCompare(b))[0]];
      }
      for (const i of ready) {
        const ds = [...preds.get(i)].filter((p) => depth.has(p)).map((p) => depth.get(p) + 1);
        depth.set(i, ds.length ? Math.max(...ds) : 0);
        left.delete(i);
      }
    }
    const cols = new Map();
    for (const i of [...ids].sort()) {
      const d = depth.get(i);
      if (!cols.has(d)) cols.set(d, []);
      cols.get(d).push(i);
    }
    const row = new Map();
    const pos = new Map();
    for (const d of [...cols.keys()].sort((a, b) => a - b)) {
      const col = cols.get(d);
      const key = (i) => {
        const rs = [...preds.get(i)].filter((p) => row.has(p)).map((p) => row.get(p));
        return rs.length ? rs.reduce((a, b) => a + b, 0) / rs.length : Infinity;
      };
      col.sort((a, b) => key(a) - key(b) || a.localeCompare(b));
      col.forEach((i, k) => {
        row.set(i, k - (col.length - 1) / 2);
        pos.set(i, { x: d * COL, y: row.get(i) * ROW });
      });
    }
    return pos;
  }

  function runLayout(known) {
    // Run on the first data and when nodes are added; nodes already drawn keep their place.
    const first = known.size === 0;
    const pos = layered();
    cy.nodes().forEach((n) => {
      if (known.has(n.id())) return;
      let p = pos.get(n.id());
      const taken = (q) => cy.nodes().some((o) => o !== n && known.has(o.id()) && Math.hypot(o.position("x") - q.x, o.position("y") - q.y) < 70);
      for (let i = 0; i < 30 && !first && taken(p); i++) p = { x: p.x, y: p.y + ROW };
      n.position(p);
      known.set(n.id(), p);
    });
    // The view moves (never the nodes) only when a node would be out of it.
    const ext = cy.extent();
    const out = cy.nodes().some((n) => {
      const q = n.position();
      return q.x < ext.x1 || q.x > ext.x2 || q.y < ext.y1 || q.y > ext.y2;
    });
    if (first || out) cy.fit(undefined, 40);
    if (cy.zoom() > 1.4) {
      cy.zoom(1.4);
      cy.center();
    }
  }

  function renderGraph(st) {
    if (!initGraph()) return;
    const { nodes, edges } = graphElements(st);
    const known = new Map();
    cy.nodes().forEach((n) => known.set(n.id(), { ...n.position() }));
    const want = new Set([...nodes, ...edges].map((e) => e.data.id));
    let added = false;
    cy.batch(() => {
      cy.elements().forEach((ele) => {
        if (!want.has(ele.id())) ele.remove();
      });
      for (const n of nodes) {
        const have = cy.getElementById(n.data.id);
        if (have.nonempty()) have.data(n.data);
        else {
          cy.add(n);
          added = true;
        }
      }
      for (const e of edges) {
        const have = cy.getElementById(e.data.id);
        if (have.nonempty() && have.data("source") === e.data.source && have.data("target") === e.data.target) {
          have.data(e.data);
        } else {
          if (have.nonempty()) have.remove();
          cy.add(e);
        }
      }
    });
    if (added) runLayout(known);
    if (added || edges.some((e) => e.data.denied && !arcs.has(e.data.id))) bendDenied();
    $("graph").setAttribute("data-nodes", String(cy.nodes().length));
    $("graph").setAttribute("data-edges", String(cy.edges().length));
  }

  // --- the tables ----------------------------------------------------------

  function renderGraphTables(st) {
    const kinds = new Map(st.nodes.map((n) => [n.id, n.kind]));
    fill($("nodes-table").tBodies[0], st.nodes.map((n) => {
      const health = n.health || "unknown";
      const hcls = health === "down" ? "bad" : health === "degraded" ? "warn" : health === "healthy" ? "ok" : "idle";
      const mtls = n.mtls ? [icon(n.mtls === "strict" ? "lock" : "warn"), " " + n.mtls] : ["—"];
      return h("tr", { "data-node-id": n.id, "data-health": health, "data-kind": n.kind || "" },
        h("th", { scope: "row", text: n.name || n.id }),
        h("td", { text: n.kind || "" }),
        h("td", {}, badge(hcls, health)),
        h("td", { text: num(n.instances) ? (num(n.instances_up) ? n.instances_up : "?") + "/" + n.instances : "—" }),
        h("td", { class: "mtls" }, mtls),
        h("td", { class: "n", text: fmtRps(n.rps) }),
        h("td", { class: "n", text: fmtPct(n.success) }),
        h("td", { class: "n", text: fmtMs(n.p99_ms) }));
    }), "No nodes yet.", 8);
    const edges = [...st.edges].sort((a, b) => (b.rps || 0) - (a.rps || 0) || a.id.localeCompare(b.id));
    fill($("edges-table").tBodies[0], edges.map((e) => {
      const lock = e.mtls ? [icon("lock"), " yes"] : plaintextWarned(e, kinds) ? [icon("warn"), " no"] : ["no"];
      return h("tr", {
        "data-edge-id": e.id, "data-source": e.source, "data-target": e.target,
        "data-rps": num(e.rps) ? e.rps : 0, "data-mtls": String(!!e.mtls), "data-denied": String(!!e.denied),
        class: e.denied ? "denied" : "",
      },
      h("th", { scope: "row", text: e.source }),
      h("td", { text: e.target }),
      h("td", { class: "n", text: fmtRps(e.rps) }),
      h("td", { class: "n" }, e.denied ? "—" : badge(successClass(e.success), fmtPct(e.success))),
      h("td", { class: "n", text: fmtMs(e.p99_ms) }),
      h("td", { class: "n", text: num(e.requests) ? e.requests : "—" }),
      h("td", { class: "mtls" }, lock),
      h("td", { class: "why", text: e.denied ? "⊘ " + explainEdge(e) : "no" }));
    }), "No calls seen yet.", 8);
  }

  function serviceNames(st) {
    const names = new Set(Object.keys(st.services || {}));
    for (const n of st.nodes) if (n.kind === "service" || n.kind === "gateway") names.add(n.id);
    return [...names].sort();
  }

  function setOptions(select, values, keep) {
    const cur = keep !== undefined ? keep : select.value;
    const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === String(v.value));
    if (!same) select.replaceChildren(...values.map((v) => h("option", { value: v.value, text: v.label })));
    if (values.some((v) => String(v.value) === String(cur))) select.value = String(cur);
  }

  function selectService(name) {
    selected = name;
    $("service-select").value = name;
    renderService(state);
    if (cy) {
      cy.nodes().unselect();
      cy.getElementById(name).select();
    }
  }

  function renderService(st) {
    const names = serviceNames(st);
    if (!selected || !names.includes(selected)) {
      selected = names.find((n) => st.services && st.services[n]) || names[0] || null;
    }
    setOptions($("service-select"), names.map((n) => ({ value: n, label: n })), selected);
    const panel = $("service-panel");
    panel.setAttribute("data-service", selected || "");
    const svc = (selected && st.services && st.services[selected]) || {};
    const insts = svc.instances || [];
    fill($("instances-table").tBodies[0], insts.map((i) => h("tr", { "data-instance": i.id, "data-expiring": String(!!i.expiring) },
      h("th", { scope: "row", text: i.id }),
      h("td", { text: i.address || "—" }),
      h("td", {}, i.static ? badge("idle", "static") : i.healthy ? badge("ok", "up")
        : badge("bad", i.connected === false ? "down (disconnected)" : "down")),
      h("td", { text: i.version || "—" }),
      h("td", { text: i.zone || "—" }),
      h("td", { class: "mono", text: i.serial || "—" }),
      h("td", { class: i.expiring ? "expiring" : "" },
        i.expiring ? badge("warn", "expiring") : null, " ", fmtDate(i.not_after), " ",
        h("span", { class: "muted", text: fmtIn(i.not_after) })),
      h("td", {}, i.nack ? badge("bad", "NACK: " + i.nack) : num(i.acked) ? "ACKed " + i.acked : "—"))),
    "No instances registered.", 8);

    const golden = svc.golden || {};
    fill($("golden-table").tBodies[0], ["1m", "5m", "15m"].map((w) => {
      const g = golden[w] || {};
      return h("tr", { "data-window": w },
        h("th", { scope: "row", text: w.replace("m", " min") }),
        h("td", { class: "n", text: fmtRps(g.rps) }),
        h("td", { class: "n" }, num(g.success) ? badge(successClass(g.success), fmtPct(g.success)) : "—"),
        h("td", { class: "n", text: fmtMs(g.p50_ms) }),
        h("td", { class: "n", text: fmtMs(g.p99_ms) }));
    }), "", 5);

    const routes = svc.routes || [];
    $("routes-list").replaceChildren(...(routes.length ? routes.map(renderRoute) : [h("p", { class: "muted", text: "No routes lead here." })]));

    const r = svc.resilience || {};
    const failures = Object.entries(r.try_failures || {});
    $("resilience").replaceChildren(
      h("dt", { text: "Retry attempts" }), h("dd", { text: num(r.retries) ? r.retries : "—" }),
      h("dt", { text: "Retry budget exhausted" }), h("dd", {}, r.budget_exhausted ? badge("warn", String(r.budget_exhausted)) : "0"),
      h("dt", { text: "Circuit breaker" }), h("dd", { "data-breaker": String(!!r.breaker_open) }, r.breaker_open ? badge("bad", "open") : badge("ok", "closed")),
      h("dt", { text: "Failed tries" }), h("dd", { text: failures.length ? failures.map(([k, v]) => k + ": " + v).join(", ") : "none" }),
      ...(r.endpoints ? [h("dt", { text: "Endpoints, as callers see them" }),
        h("dd", { text: Object.entries(r.endpoints).map(([k, v]) => k + ": " + v).join(", ") || "none" })] : []));

    fill($("policies-table").tBodies[0], (svc.policies || []).map((p) => h("tr", { "data-policy": p.policy, "data-rule": p.rule },
      h("th", { scope: "row", text: p.policy }),
      h("td", {}, p.rule, p.action ? h("span", { class: "muted", text: " (" + p.action + ")" }) : null,
        p.audit_deny ? [" ", badge("warn", "audit: would deny " + p.audit_deny)] : null),
      h("td", { class: "n", text: p.allow }),
      h("td", { class: "n" }, p.deny ? badge("bad", String(p.deny)) : "0"))),
    "No authorization policy.", 4);
  }

  function renderRoute(route) {
    if (!route.split) {
      return h("p", { class: "route", "data-route": route.route },
        h("strong", { text: route.route }), " → ", route.upstream || "—");
    }
    const rows = route.split.map((b) => h("tr", { "data-upstream": b.upstream, "data-weight": b.weight, "data-share": num(b.share) ? b.share : "" },
      h("th", { scope: "row", text: b.upstream }),
      h("td", { class: "n", text: b.weight }),
      h("td", { class: "n", text: num(b.requests) ? b.requests : "—" }),
      h("td", { class: "n share" },
        h("span", { class: "bar", "aria-hidden": "true" }, h("span", { style: null, "data-w": "" })),
        fmtShare(b.share))));
    const table = h("table", { class: "split", "data-route": route.route },
      h("caption", { text: "Route " + route.route + ": split" }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Upstream" }), h("th", { scope: "col", text: "Weight" }), h("th", { scope: "col", text: "Requests" }), h("th", { scope: "col", text: "Live share" }))),
      h("tbody", {}, rows));
    // Bar widths via CSSOM (the CSP allows no inline style attributes).
    table.querySelectorAll("tbody tr").forEach((tr, i) => {
      const s = route.split[i].share;
      tr.querySelector(".bar > span").style.width = (num(s) ? Math.max(0, Math.min(1, s)) * 100 : 0) + "%";
    });
    return labelScrollers(h("div", { class: "scroll", tabindex: "0", role: "region" }, table));
  }

  function renderDenials(st) {
    const all = [...(st.denials || [])].sort((a, b) => (b.at || 0) - (a.at || 0));
    const ds = all.slice(0, DENIALS_SHOWN);
    $("denials-more").textContent = all.length > ds.length ? "and " + (all.length - ds.length) + " older ones" : "";
    fill($("denials-table").tBodies[0], ds.map((d) => {
      const btn = h("button", { type: "button", class: "small", text: "Explain", "aria-label": "Explain " + (d.method || "GET") + " " + (d.path || "/") + " from " + d.source + " to " + d.destination });
      btn.addEventListener("click", () => {
        $("explain-source").value = d.source_identity || d.source;
        setOptions($("explain-destination"), destinations(st), d.destination);
        $("explain-method").value = d.method || "GET";
        $("explain-path").value = d.path || "/";
        explain();
      });
      return h("tr", { "data-policy": d.policy || "" },
        h("td", { text: fmtTime(d.at) }),
        h("th", { scope: "row", title: d.source_identity || null, text: d.source }),
        h("td", { text: d.destination }),
        h("td", { class: "mono", text: (d.method || "") + " " + (d.path || "") }),
        h("td", { text: d.policy || "—" }),
        h("td", {}, d.rule ? "rule " + d.rule : d.reason || "—", " ", btn));
    }), "No denials.", 6);
    const names = serviceNames(st);
    $("explain-sources").replaceChildren(...names.map((n) => h("option", { value: n })));
    setOptions($("explain-destination"), destinations(st));
  }

  function destinations(st) {
    return serviceNames(st).filter((n) => n !== "gateway").map((n) => ({ value: n, label: n }));
  }

  function explain() {
    const q = new URLSearchParams({
      source: $("explain-source").value.trim(), destination: $("explain-destination").value,
      method: $("explain-method").value, path: $("explain-path").value.trim() || "/",
    });
    const out = $("explain-result");
    out.replaceChildren(h("p", { class: "muted", text: "Asking…" }));
    out.removeAttribute("data-decision");
    api("api/explain?" + q.toString()).then((r) => {
      const allow = r.decision === "allow";
      out.setAttribute("data-decision", r.decision || "");
      out.replaceChildren(
        h("p", {}, badge(allow ? "ok" : "bad", allow ? "allowed" : "denied"), " ",
          q.get("method") + " " + q.get("path") + " from " + q.get("source") + " to " + q.get("destination")),
        h("dl", { class: "kv" },
          h("dt", { text: "Policy" }), h("dd", { class: "policy", text: r.policy || "—" }),
          h("dt", { text: "Rule" }), h("dd", { text: r.rule || "—" }),
          h("dt", { text: "Reason" }), h("dd", { text: r.reason || "—" })),
        (r.trace || []).length ? h("ol", { class: "trace", "aria-label": "The rules, in order" }, r.trace.map(traceItem)) : null,
        ...(r.notes || []).map((n) => h("p", { class: "note", text: "Note: " + n })));
    }).catch((err) => {
      out.setAttribute("data-decision", "error");
      out.replaceChildren(h("p", {}, badge("bad", "error"), " ", err.message));
    });
  }

  function traceItem(t) {
    if (typeof t === "string") return h("li", { text: t });
    const what = t.matches ? "matches" : "does not match";
    return h("li", { "data-matches": String(!!t.matches) },
      h("strong", { text: t.name || "rule" }), " (" + (t.action || "?") + "): " + what + (t.why ? ": " + t.why : ""));
  }

  function renderConfig(st) {
    const cfg = st.config || {};
    const gens = [...(cfg.generations || [])].sort((a, b) => b.generation - a.generation);
    fill($("generations-table").tBodies[0], gens.map((g) => h("tr", { "data-generation": g.generation },
      h("th", { scope: "row" }, String(g.generation), g.generation === cfg.generation ? [" ", badge("ok", "served")] : null),
      h("td", { text: fmtDate(g.loaded_at) }),
      h("td", { text: g.by || "—" }),
      h("td", { class: "mono", text: g.digest || "—" }))), "No generations.", 4);
    const opts = gens.map((g) => ({ value: g.generation, label: "Generation " + g.generation }));
    const from = $("diff-from");
    const to = $("diff-to");
    setOptions(from, opts, from.value || (gens[1] ? gens[1].generation : gens[0] && gens[0].generation));
    setOptions(to, opts, to.value || (gens[0] && gens[0].generation));
    const proxies = [...(cfg.proxies || [])].sort((a, b) => (a.service + a.id).localeCompare(b.service + b.id));
    fill($("proxies-table").tBodies[0], proxies.map((p) => h("tr", { "data-proxy": p.id, class: p.nack ? "nack" : "" },
      h("th", { scope: "row", class: "mono", text: p.id }),
      h("td", { text: p.service || "—" }),
      h("td", { class: "n" }, p.acked === p.sent ? String(p.acked) : badge("warn", String(p.acked ?? "—"))),
      h("td", { class: "n", text: p.sent ?? "—" }),
      h("td", {}, p.connected === false ? badge("bad", "disconnected") : num(p.report_age) ? p.report_age.toFixed(0) + " s ago" : "—"),
      h("td", {}, p.nack ? badge("bad", p.nack) : "—"))), "No proxies connected.", 6);
  }

  function showDiff() {
    const out = $("diff-output");
    const q = new URLSearchParams({ from: $("diff-from").value, to: $("diff-to").value });
    out.textContent = "Loading…";
    api("api/config/diff?" + q.toString()).then((r) => {
      const lines = (r.diff || "").split("\n");
      if (!r.diff) {
        out.textContent = "No difference between generation " + r.from + " and " + r.to + ".";
        return;
      }
      out.replaceChildren(...lines.map((l) => h("span", {
        class: l.startsWith("+++") || l.startsWith("---") ? "hd" : l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : l.startsWith("@@") ? "hunk" : "",
        text: l + "\n",
      })));
    }).catch((err) => {
      out.textContent = "The diff failed: " + err.message;
    });
  }

  function renderEdge(st) {
    const edge = st.edge || {};
    const routes = [...(edge.routes || [])].sort((a, b) => (b.rps || 0) - (a.rps || 0));
    fill($("edge-routes-table").tBodies[0], routes.map((r) => h("tr", { "data-route": r.route, "data-rps": num(r.rps) ? r.rps : 0 },
      h("th", { scope: "row", text: r.route }),
      h("td", { class: "n", text: fmtRps(r.rps) }),
      h("td", { class: "n" }, num(r.success) ? badge(successClass(r.success), fmtPct(r.success)) : "—"),
      h("td", { class: "n", text: fmtMs(r.p99_ms) }))), "No edge routes.", 4);
    const refusals = [
      ...(edge.refusals || []).map((r) => ({ kind: "refusal", name: r.reason, count: r.count })),
      ...(edge.auth_failures || []).map((r) => ({ kind: "auth", name: "auth: " + r.reason, count: r.count })),
      ...(edge.ratelimited || []).map((r) => ({ kind: "ratelimit", name: "rate limit " + r.limit, count: r.count })),
    ];
    fill($("refusals-table").tBodies[0], refusals.map((r) => h("tr", { "data-reason": r.name, "data-kind": r.kind },
      h("th", { scope: "row", text: r.name }), h("td", { class: "n", text: r.count }))), "No refusals.", 2);
    const consumers = [...(edge.consumers || [])].sort((a, b) => b.requests - a.requests);
    fill($("consumers-table").tBodies[0], consumers.map((c) => h("tr", { "data-consumer": c.consumer },
      h("th", { scope: "row", text: c.consumer }), h("td", { class: "n", text: c.requests }))), "No consumers seen.", 2);
  }

  function renderHeader(st) {
    $("scope").textContent = st.scope || "—";
    $("trust-domain").textContent = st.trust_domain || "—";
    $("window").textContent = (st.window || "—") + (st.counts_window ? " (counts " + st.counts_window + ")" : "");
    $("updated").textContent = fmtTime(st.generated_at);
    const src = st.metrics_source || { kind: "reports" };
    const el = $("metrics-source");
    if (src.kind === "prometheus") {
      el.textContent = "Prometheus " + (src.healthy ? "(answering)" : "(failing: " + (src.last_error || "no answer yet") + ")");
      el.title = src.url || "";
    } else {
      el.textContent = st.scope === "gateway" ? "this gateway's counters" : "proxy reports";
      el.title = "";
    }
    el.setAttribute("data-state", src.kind === "prometheus" && !src.healthy ? "failing" : "ok");
  }

  function apply(st) {
    if (!st || !Array.isArray(st.nodes) || !Array.isArray(st.edges)) return;
    state = st;
    window.meshgateState = st;
    updates += 1;
    renderHeader(st);
    renderGraph(st);
    renderGraphTables(st);
    renderService(st);
    renderDenials(st);
    renderConfig(st);
    renderEdge(st);
    document.body.setAttribute("data-updates", String(updates));
    document.body.setAttribute("data-generated-at", String(st.generated_at));
    document.dispatchEvent(new CustomEvent("meshgate:state", { detail: st }));
  }

  // --- live updates --------------------------------------------------------

  function status(kind, text) {
    const el = $("conn");
    el.setAttribute("data-state", kind);
    el.textContent = text;
  }

  function handleEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (name === "state" && data.length) apply(JSON.parse(data.join("\n")));
  }

  function later(why) {
    status("offline", why + "; retrying in " + Math.round(retry / 1000) + " s");
    setTimeout(connect, retry);
    retry = Math.min(RETRY_MAX, retry * 2);
  }

  function connectWithToken() {
    // EventSource cannot send a header: read the event stream with fetch.
    fetch(new URL("events", BASE), {
      headers: { Authorization: "Bearer " + TOKEN, Accept: "text/event-stream" },
      cache: "no-store",
    }).then(async (r) => {
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      retry = 1000;
      status("live", "Live");
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          handleEvent(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
      throw new Error("the stream ended");
    }).catch((err) => later("Disconnected (" + err.message + ")"));
  }

  function connect() {
    if (TOKEN) {
      connectWithToken();
      return;
    }
    if (!window.EventSource) {
      status("polling", "Polling every 2 s");
      setInterval(() => api("api/state").then(apply).catch(() => {}), 2000);
      return;
    }
    source = new EventSource(new URL("events", BASE));
    source.addEventListener("open", () => {
      retry = 1000;
      status("live", "Live");
    });
    source.addEventListener("state", (ev) => {
      try {
        apply(JSON.parse(ev.data));
        status("live", "Live");
      } catch (err) {
        status("error", "A bad update: " + err.message);
        console.error(err);
      }
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error): try again, slower each time.
        source.close();
        later("Disconnected");
      } else {
        status("reconnecting", "Reconnecting…");
      }
    });
  }

  function labelScrollers(root) {
    // A scrolling table is a focusable region (keyboard scrolling), named after its table.
    const all = root.matches && root.matches(".scroll") ? [root] : root.querySelectorAll(".scroll[role=region]");
    for (const div of all) {
      if (div.hasAttribute("aria-label")) continue;
      const cap = div.querySelector("caption");
      let prev = div.previousElementSibling;
      while (prev && !/^H[1-6]$/.test(prev.tagName)) prev = prev.previousElementSibling;
      const name = cap ? cap.textContent : prev ? prev.textContent : "Table";
      div.setAttribute("aria-label", name + " (table)");
    }
    return root;
  }

  function start() {
    labelScrollers(document);
    $("service-select").addEventListener("change", (ev) => selectService(ev.target.value));
    $("explain-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      explain();
    });
    $("diff-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      showDiff();
    });
    api("api/state").then(apply).catch((err) => {
      status("offline", "No state yet: " + err.message);
      if (!(err instanceof TypeError)) console.error(err);
    });
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
