// The fleet page: polls /v1/fleet and redraws in place. Plain JavaScript, hand-drawn SVG, no build step.
// Data never goes through innerHTML: every cell is set with textContent.
(function () {
  "use strict";

  const FEED = "/v1/fleet";
  const POLL_MS = 2000;
  const KEY = "trmrl.fleetKey";
  const FILTER = "trmrl.fleetFilter";
  const COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  let filter = { model: null, version: null };
  let timer = null;
  let renders = 0;
  const colorOf = new Map();

  // -- formatting ---------------------------------------------------------------------------------------
  function fmtNum(v, digits) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (a >= 1000) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(digits === undefined ? (a >= 100 ? 0 : a >= 10 ? 1 : 2) : digits);
  }
  function fmtInt(v) { return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"); }
  function fmtMs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 1) return (v * 1000).toFixed(0) + " µs";
    if (v < 10) return v.toFixed(2) + " ms";
    if (v < 1000) return v.toFixed(0) + " ms";
    return (v / 1000).toFixed(2) + " s";
  }
  function fmtBytes(v) {
    if (v === null || v === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }
  function fmtIdle(s) {
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  const short = (version) => version.slice(0, 8);
  function colorFor(label) {
    if (!colorOf.has(label)) colorOf.set(label, COLORS[colorOf.size % COLORS.length]);
    return colorOf.get(label);
  }

  // -- DOM helpers ----------------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    return node;
  }
  function cell(row, text, cls) { const td = el("td", cls, text); row.appendChild(td); return td; }
  function fillTable(id, rows, columns, build) {
    const tbody = $(id).tBodies[0];
    const fresh = document.createElement("tbody");
    if (!rows.length) {
      const tr = el("tr");
      const td = cell(tr, "Nothing yet.", "empty");
      td.colSpan = columns;
      fresh.appendChild(tr);
    }
    for (const row of rows) fresh.appendChild(build(row));
    tbody.replaceWith(fresh);
  }
  function setText(id, text) { const node = $(id); if (node.textContent !== text) node.textContent = text; }

  // -- charts ---------------------------------------------------------------------------------------------
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 6, 8, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }
  // series: [{label, values: [number|null], color, dashed}]; xs: the x of each value.
  function lineChart(svg, xs, series, opts) {
    const w = Math.max(svg.clientWidth || 600, 200);
    const h = Math.max(svg.clientHeight || 200, 120);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const pad = { l: 52, r: 12, t: 10, b: 26 };
    const all = [];
    for (const s of series) for (const v of s.values) if (v !== null && v !== undefined) all.push(v);
    if (!all.length || !xs.length) {
      const t = svgEl("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "nodata" });
      t.textContent = opts.empty || "No data yet";
      svg.appendChild(t);
      return;
    }
    let lo = Math.min(0, ...all);
    let hi = Math.max(...all);
    if (lo < 0) { const m = niceMax(Math.max(-lo, hi)); lo = -m; hi = hi > 0 ? m : 0; }
    hi = niceMax(hi > lo ? hi : lo + 1);
    if (lo < 0 && hi === 0) hi = 0.0001;
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const sx = (x) => pad.l + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
    const sy = (y) => pad.t + (1 - (y - lo) / (hi - lo)) * (h - pad.t - pad.b);
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const y = sy(v);
      svg.appendChild(svgEl("line", { x1: pad.l, x2: w - pad.r, y1: y, y2: y, class: i === 0 ? "axis" : "grid" }));
      const t = svgEl("text", { x: pad.l - 6, y: y + 4, "text-anchor": "end" });
      t.textContent = opts.yFormat ? opts.yFormat(v) : fmtNum(v);
      svg.appendChild(t);
    }
    const ticks = xTicks(x0, x1, opts.xSteps || [1, 2, 5, 10, 20, 25, 50, 100, 200]);
    ticks.forEach((x, i) => {
      const anchor = sx(x) < pad.l + 12 ? "start" : sx(x) > w - pad.r - 12 ? "end" : "middle";
      const t = svgEl("text", { x: sx(x), y: h - 8, "text-anchor": anchor });
      t.textContent = opts.xFormat ? opts.xFormat(x) : fmtNum(x, 0);
      svg.appendChild(t);
      if (i) svg.appendChild(svgEl("line", { x1: sx(x), x2: sx(x), y1: h - pad.b, y2: h - pad.b + 4, class: "axis" }));
    });
    for (const s of series) {
      let d = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        d += (pen ? "L" : "M") + sx(xs[i]).toFixed(1) + "," + sy(v).toFixed(1);
        pen = true;
      });
      if (!d) continue;
      const path = svgEl("path", { d, stroke: s.color, class: "line" + (s.dashed ? " dashed" : "") + (s.cls ? " " + s.cls : "") });
      path.setAttribute("data-label", s.label);
      svg.appendChild(path);
    }
  }
  // Round tick positions between x0 and x1: multiples of the first step giving at most six ticks.
  function xTicks(x0, x1, steps) {
    const span = x1 - x0;
    if (span <= 0) return [x0];
    const step = steps.find((s) => span / s <= 6) || steps[steps.length - 1];
    const out = [];
    for (let x = Math.ceil(x0 / step) * step; x <= x1 + 1e-9; x += step) out.push(x);
    return out;
  }
  function legend(id, series) {
    const box = $(id);
    const fresh = el("div", "legend");
    fresh.id = id;
    for (const s of series) {
      const item = el("span", "item");
      const sw = svgEl("svg", { width: 18, height: 10, class: "swatch-line" });
      sw.appendChild(svgEl("line", { x1: 1, x2: 17, y1: 5, y2: 5, stroke: s.color, "stroke-width": 2.5, "stroke-dasharray": s.dashed ? "4 3" : "" }));
      item.appendChild(sw);
      item.appendChild(document.createTextNode(" " + s.label));
      fresh.appendChild(item);
    }
    box.replaceWith(fresh);
  }
  // A centred moving average (the curves are noisy step by step).
  function smooth(values, k) {
    return values.map((v, i) => {
      if (v === null) return null;
      let sum = 0, n = 0;
      for (let j = Math.max(0, i - k); j <= Math.min(values.length - 1, i + k); j++) {
        if (values[j] !== null) { sum += values[j]; n++; }
      }
      return sum / n;
    });
  }

  // -- rendering ------------------------------------------------------------------------------------------
  function render(feed) {
    const t = feed.totals;
    setText("t-sessions", fmtInt(t.sessions));
    setText("t-actions", fmtNum(t.actions_per_s));
    setText("t-requests", fmtNum(t.requests_per_s));
    setText("t-errors", fmtNum(t.errors_per_s));
    $("t-errors").classList.toggle("bad", t.errors_per_s > 0);
    const devices = feed.devices.reduce((a, d) => a + d.allocated_bytes, 0);
    setText("t-memory", fmtBytes(devices || t.device_bytes));
    setText("window-hint", `rates and percentiles over the last ${feed.service.window_s.toFixed(0)} s`);
    setText("window-s", feed.service.window_s.toFixed(0));

    fillTable("models", feed.models, 9, (m) => {
      const tr = el("tr");
      tr.dataset.model = m.model;
      tr.dataset.version = m.version;
      const name = cell(tr, "");
      const sw = el("span", "swatch");
      sw.style.background = colorFor(m.model + "@" + m.version);
      name.appendChild(sw);
      name.appendChild(document.createTextNode(m.model));
      cell(tr, short(m.version), "mono").title = m.version;
      const serving = cell(tr, "");
      let badge;
      const canaryShare = feed.models
        .filter((o) => o.model === m.model && o.version !== m.version)
        .reduce((a, o) => a + o.canary_share, 0);
      if (m.active) badge = el("span", "badge active", canaryShare > 0 ? `active ${Math.round((1 - canaryShare) * 100)}%` : "active");
      else if (m.canary_share > 0) badge = el("span", "badge canary", `canary ${Math.round(m.canary_share * 100)}%`);
      else badge = el("span", "badge loaded", "loaded");
      badge.classList.add("serving");
      serving.appendChild(badge);
      cell(tr, fmtInt(m.sessions), "num sessions");
      cell(tr, fmtNum(m.actions_per_s), "num actions");
      cell(tr, `${fmtNum(m.batch_mean)} / ${fmtNum(m.batch_p99)}`, "num");
      cell(tr, `${fmtMs(m.queue_wait_mean_ms)} / ${fmtMs(m.queue_wait_p99_ms)}`, "num");
      const memory = cell(tr, fmtBytes(m.device_bytes), "num");
      if (m.cache) {
        // A trial-context model: its key/value cache blocks, held of what it has (or of its budget).
        const c = m.cache;
        const of = c.budget_blocks ?? c.blocks_held + c.blocks_free;
        const line = el("div", "sub cache", `cache ${fmtInt(c.blocks_held)} / ${fmtInt(of)} blocks`);
        if (c.refused_steps > 0) line.textContent += ` · ${fmtInt(c.refused_steps)} refused`;
        memory.appendChild(line);
      }
      cell(tr, `${fmtNum(m.reward_first20, 3)} / ${fmtNum(m.reward_after20, 3)}`, "num");
      return tr;
    });

    const at = feed.series.at_s;
    const xs = at.map((t) => t - at[at.length - 1]);
    const labels = Object.keys(feed.series.actions_per_s);
    const actionSeries = labels.map((label) => ({
      label: label.replace(/@(.{8}).*/, " @ $1"), values: feed.series.actions_per_s[label], color: colorFor(label),
    }));
    const ago = (x) => (Math.abs(x) < 0.5 ? "now" : -x < 120 ? `−${Math.round(-x)} s` : `−${Math.round(-x / 60)} min`);
    const timeSteps = [5, 10, 15, 30, 60, 120];
    lineChart($("chart-actions"), xs, actionSeries, { xFormat: ago, xSteps: timeSteps, empty: "Collecting…" });
    legend("legend-actions", actionSeries);
    const latency = [
      { label: "p50", values: feed.series.latency_p50_ms, color: "#0891b2" },
      { label: "p99", values: feed.series.latency_p99_ms, color: "#7c3aed", dashed: true },
    ];
    lineChart($("chart-latency"), xs, latency, { xFormat: ago, xSteps: timeSteps, yFormat: (v) => fmtMs(v), empty: "Collecting…" });
    legend("legend-latency", latency);

    renderCurves(feed.adaptation);

    fillTable("routes", feed.routes, 5, (r) => {
      const tr = el("tr");
      const route = cell(tr, "");
      route.appendChild(el("span", "mono", `${r.method} ${r.route}`));
      cell(tr, fmtNum(r.requests_per_s), "num");
      cell(tr, fmtMs(r.p50_ms), "num");
      cell(tr, fmtMs(r.p99_ms), "num");
      cell(tr, fmtInt(r.errors), "num");
      return tr;
    });
    fillTable("errors", feed.errors, 5, (e) => {
      const tr = el("tr");
      tr.dataset.status = e.status;
      cell(tr, "").appendChild(el("span", "badge " + (e.status >= 500 ? "status5" : "status4"), String(e.status)));
      cell(tr, `${e.method} ${e.route}`, "mono");
      cell(tr, fmtNum(e.per_s), "num");
      cell(tr, fmtInt(e.count), "num");
      cell(tr, fmtInt(e.total), "num");
      return tr;
    });

    const s = feed.sessions;
    const shown = s.filter.model || s.filter.version
      ? `${s.filter.model || "any model"}${s.filter.version ? " @ " + short(s.filter.version) : ""}: `
      : "";
    setText("sessions-hint", `${shown}${fmtInt(s.rows.length)} most recently active of ${fmtInt(s.matching)}`);
    fillTable("sessions", s.rows, 8, (r) => {
      const tr = el("tr");
      cell(tr, r.id_prefix + "…", "mono");
      cell(tr, r.model);
      cell(tr, short(r.version), "mono");
      cell(tr, fmtInt(r.steps), "num");
      cell(tr, fmtInt(r.episodes), "num");
      cell(tr, fmtNum(r.last_return, 2), "num");
      cell(tr, fmtNum(r.episode_return, 2), "num");
      cell(tr, fmtIdle(r.idle_s), "num");
      return tr;
    });
  }

  function renderCurves(curves) {
    const box = $("curves");
    const withData = curves.filter((c) => c.first_rewards + c.later_rewards > 0);
    const wanted = withData.map((c) => c.model + "@" + c.version).join(",");
    if (box.dataset.keys !== wanted) {
      while (box.firstChild) box.removeChild(box.firstChild);
      box.dataset.keys = wanted;
      if (!withData.length) box.appendChild(el("p", "empty", "No rewards received yet."));
      for (const c of withData) {
        const fig = el("figure", "curve");
        fig.dataset.model = c.model;
        fig.dataset.version = c.version;
        const h = el("h3", null, c.model + " ");
        h.appendChild(el("span", "mono", short(c.version)));
        fig.appendChild(h);
        fig.appendChild(svgEl("svg", { class: "chart", role: "img", "aria-label": "Adaptation curve" }));
        const lg = el("div", "legend");
        lg.id = "legend-" + c.model + "-" + c.version;
        fig.appendChild(lg);
        fig.appendChild(el("p", "fine"));
        box.appendChild(fig);
      }
    }
    for (const c of withData) {
      const fig = box.querySelector(`figure[data-model="${CSS.escape(c.model)}"][data-version="${c.version}"]`);
      if (!fig) continue;
      const n = Math.max(c.first_episode.length, c.later_episodes.length);
      const xs = Array.from({ length: n }, (_, i) => i + 1);
      const k = n > 60 ? 2 : 0;
      const series = [
        { label: "first episode", values: smooth(c.first_episode, k), color: "#d97706", cls: "curve-first" },
        { label: "later episodes", values: smooth(c.later_episodes, k), color: "#2563eb", cls: "curve-later" },
      ];
      lineChart(fig.querySelector("svg"), xs, series, { empty: "No rewards yet" });
      legend(fig.querySelector(".legend").id, series);
      fig.querySelector("p.fine").textContent =
        `x: step in episode · ${fmtInt(c.first_rewards)} rewards in first episodes, ${fmtInt(c.later_rewards)} in later ones` +
        (k ? ` · ${2 * k + 1}-step moving mean` : "");
    }
  }

  // -- the feed -------------------------------------------------------------------------------------------
  function query() {
    const params = new URLSearchParams();
    if (filter.model) params.set("model", filter.model);
    if (filter.version) params.set("version", filter.version);
    const q = params.toString();
    return q ? FEED + "?" + q : FEED;
  }
  function showAuth(reason) {
    body.dataset.state = "auth";
    setText("status-text", "key needed");
    $("auth").hidden = false;
    $("auth-error").textContent = reason || "";
    $("key-input").focus();
  }
  async function poll() {
    clearTimeout(timer);
    const key = sessionStorage.getItem(KEY);
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    try {
      const reply = await fetch(query(), { headers, cache: "no-store", credentials: "omit" });
      const data = await reply.json().catch(() => null);
      const error = data && data.error ? data.error : null;
      if (reply.status === 401 || reply.status === 403 && error && error.code === "viewer_key_required") {
        showAuth(key ? `${error ? error.message : "The key was refused."}` : "");
        return; // polling resumes when a key is given
      }
      if (!reply.ok && filter.model !== null || !reply.ok && filter.version !== null) {
        $("filter-error").textContent = error ? `${error.code}: ${error.message}` : `HTTP ${reply.status}`;
        filter = { model: null, version: null };
        sessionStorage.removeItem(FILTER);
        timer = setTimeout(poll, 0);
        return;
      }
      if (!reply.ok || !data) throw new Error(error ? `${error.code}: ${error.message}` : `HTTP ${reply.status}`);
      $("auth").hidden = true;
      body.dataset.state = "live";
      setText("status-text", "live");
      render(data);
      renders += 1;
      body.dataset.renders = String(renders);
      // Milliseconds from the navigation's start (performance.now()'s origin) to the first data drawn.
      if (renders === 1) body.dataset.firstRenderMs = String(Math.round(performance.now()));
      setText("updated", "updated " + new Date().toLocaleTimeString("en-GB"));
    } catch (err) {
      body.dataset.state = "error";
      setText("status-text", "unreachable: " + (err && err.message ? err.message : err));
    }
    timer = setTimeout(poll, POLL_MS);
  }

  // -- controls -------------------------------------------------------------------------------------------
  function parseFilter(text) {
    text = text.trim();
    if (!text) return { model: null, version: null };
    const at = text.indexOf("@");
    if (at < 0) return { model: text, version: null };
    return { model: text.slice(0, at).trim() || null, version: text.slice(at + 1).trim() || null };
  }
  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("filter").value;
    if ((text.match(/@/g) || []).length > 1) {
      $("filter-error").textContent = "A filter is model, model@version or @version.";
      return;
    }
    $("filter-error").textContent = "";
    filter = parseFilter(text);
    sessionStorage.setItem(FILTER, text);
    poll();
  });
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) { $("auth-error").textContent = "Enter a key."; return; }
    sessionStorage.setItem(KEY, key);
    $("key-input").value = "";
    $("auth-error").textContent = "";
    poll();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); showAuth(""); });
  $("key-button").addEventListener("click", () => showAuth(""));

  const saved = sessionStorage.getItem(FILTER);
  if (saved) { $("filter").value = saved; filter = parseFilter(saved); }
  poll();
})();
