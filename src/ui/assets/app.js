// Stargazer dashboard. Plain script, no dependencies: it polls the gateway's
// JSON API (api/…, relative to this page) while the tab is visible, draws the
// charts on <canvas>, and builds every element with textContent (envelopes
// carry user text; nothing from the API is ever parsed as HTML).
"use strict";
(() => {
  const TOKEN_KEY = "stargazer.ui.token";
  const OPERATOR_KEY = "stargazer.ui.operator";
  const OVERVIEW_EVERY = 2000;
  const DLQ_EVERY = 5000;
  const PAGE = 50;

  const $ = (s, root = document) => root.querySelector(s);
  const $$ = (s, root = document) => Array.from(root.querySelectorAll(s));

  /** Build an element: h("td", {class: "num", "data-x": 1}, "text", child…). */
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of kids.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // ------------------------------------------------------------ formatting

  const nf = new Intl.NumberFormat();
  const fmtNum = (n) => (n === null || n === undefined ? "–" : nf.format(n));
  function fmtRate(x) {
    if (!x) return "0";
    if (x >= 100) return nf.format(Math.round(x));
    if (x >= 10) return x.toFixed(1).replace(/\.0$/, "");
    return x.toFixed(2).replace(/\.?0+$/, "") || "0";
  }
  /** A duration for people: 850ms, 12.3s, 4m05s, 3h12m, 2d04h (as `stargazer status`). */
  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    const s = Math.floor(ms / 1000);
    const p2 = (n) => String(n).padStart(2, "0");
    if (ms < 1000) return `${Math.round(ms)}ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)}s`;
    if (ms < 3600000) return `${Math.floor(s / 60)}m${p2(s % 60)}s`;
    if (ms < 86400000) return `${Math.floor(s / 3600)}h${p2(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d${p2(Math.floor((s % 86400) / 3600))}h`;
  }
  const iso = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC") : "");
  const idMs = (id) => Number(String(id || "").split("-")[0]) || 0;

  // ------------------------------------------------------------ state

  const state = {
    ov: null,
    rates: null,
    window: "minute",
    view: "overview",
    cards: new Map(),
    dlq: {
      platform: null,
      kind: "",
      channel: "",
      since: "",
      until: "",
      before: null,
      stack: [],
      page: null,
      sel: new Set(),
      open: null,
      loading: false,
    },
    firstDlqRender: true,
  };
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  const operator = () => sessionStorage.getItem(OPERATOR_KEY) || "";

  // ------------------------------------------------------------ API

  async function api(path, opts = {}) {
    const headers = { Accept: "application/json" };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    if (opts.auth) {
      if (token()) headers.Authorization = `Bearer ${token()}`;
      if (operator()) headers["X-Stargazer-Operator"] = operator();
    }
    let r;
    try {
      r = await fetch(`api/${path}`, {
        method: opts.method || "GET",
        headers,
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
        cache: "no-store",
      });
    } catch (e) {
      return { ok: false, status: 0, body: { error: `the gateway does not answer (${e.message})` } };
    }
    let body = null;
    try {
      body = await r.json();
    } catch (_) {
      body = { error: `HTTP ${r.status}` };
    }
    return { ok: r.ok, status: r.status, body };
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------ toasts

  function toast(msg, kind = "") {
    const t = h("div", { class: `toast ${kind}`, role: "status" }, msg);
    $("#toasts").append(t);
    setTimeout(() => t.remove(), kind === "bad" ? 7000 : 4000);
  }

  // ------------------------------------------------------------ overview

  function setConn(kind, text) {
    const c = $("#conn");
    c.className = `pill ${kind}`;
    c.textContent = text;
  }

  async function pollOverview() {
    const r = await api("overview");
    if (!r.ok) {
      setConn("bad", r.status === 503 ? "Redis unreachable" : "gateway unreachable");
      const b = $("#banner");
      b.hidden = false;
      b.textContent = `${r.body.error || "no answer"} — the figures below are from ${
        state.ov ? iso(state.ov.at_ms) : "nowhere yet"
      }.`;
      return;
    }
    $("#banner").hidden = true;
    state.ov = r.body;
    setConn("ok", "live");
    $("#node").textContent = r.body.node;
    renderHeader();
    renderOverview();
    if (state.view === "dlq") syncPlatformSelect();
  }

  async function pollRates() {
    const r = await api(`rates?window=${state.window}`);
    if (r.ok) {
      state.rates = r.body;
      for (const [name, card] of state.cards) drawCard(name, card);
    }
  }

  function renderHeader() {
    const ov = state.ov;
    const total = ov.platforms.reduce((a, p) => a + p.dead_letters, 0);
    const c = $("#dlq-count");
    c.textContent = fmtNum(total);
    c.classList.toggle("zero", total === 0);
    const b = $("#token-btn");
    if (!ov.actions_enabled) {
      b.textContent = "Read-only";
      b.disabled = true;
      b.title = "No action token is configured on this gateway (http.ui_token_env): replay and purge are off.";
      b.classList.remove("unlocked");
    } else if (token()) {
      b.disabled = false;
      b.textContent = "Actions unlocked";
      b.title = "Replay and purge are enabled in this tab. Click to change or forget the token.";
      b.classList.add("unlocked");
    } else {
      b.disabled = false;
      b.textContent = "Unlock actions";
      b.title = "Enter the dashboard token to replay or purge dead letters.";
      b.classList.remove("unlocked");
    }
  }

  function kpi(key, label, href) {
    const v = h("div", { class: "v" }, "–");
    const s = h("div", { class: "s" }, "");
    const el = h(href ? "a" : "div", { class: "kpi", "data-kpi": key, href }, h("div", { class: "l" }, label), v, s);
    return { el, v, s };
  }

  function buildCard(p) {
    const k = {
      stream: kpi("stream", "Stream"),
      lag: kpi("lag", "Lag"),
      pending: kpi("pending", "Pending"),
      oldest: kpi("oldest", "Oldest pending"),
      dlq: kpi("dlq", "Dead letters", `#dlq?platform=${enc(p.platform)}`),
      gaps: kpi("gaps", "Order gaps"),
      gateways: kpi("gateways", "Gateways"),
      rate: kpi("rate", "Delivered / s"),
    };
    const ready = h("span", { class: "pill", "data-ready": "" }, "…");
    const reason = h("span", { class: "reason" });
    const legend = {
      delivered: h("b"),
      retries: h("b"),
      dead: h("b"),
      fleet: h("b"),
    };
    const canvas = h("canvas", { class: "chart", height: 140 });
    const gwBody = h("tbody");
    const gapBody = h("tbody");
    const gwPane = h("div", { class: "pane" }, h("h3", {}, "Gateways"),
      h("table", { class: "grid mini" },
        h("thead", {}, h("tr", {}, h("th", {}, "Consumer"), h("th", {}, "Health"), h("th", { class: "num" }, "Pending"),
          h("th", { class: "num" }, "Idle"), h("th", { class: "num" }, "Heartbeat"))),
        gwBody));
    const gapNone = h("div", { class: "none" }, "No channel waits on a missing seq.");
    const gapTable = h("table", { class: "grid mini" },
      h("thead", {}, h("tr", {}, h("th", {}, "Channel"), h("th", { class: "num" }, "Waits for"), h("th", { class: "num" }, "Done"),
        h("th", { class: "num" }, "Waiting"), h("th", {}, "Why"))),
      gapBody);
    const gapPane = h("div", { class: "pane" }, h("h3", {}, "Channels waiting on an order gap"), gapNone, gapTable);
    const limitsList = h("div", { class: "limits" });
    const limitsPane = h("div", { class: "pane" }, h("h3", {}, "Limits and circuit"), limitsList);
    const el = h("article", { class: "card platform", "data-platform": p.platform },
      h("div", { class: "head" },
        h("span", { class: "name" }, p.platform),
        h("span", { class: "badge" }, p.adapter),
        ready, reason, h("div", { class: "spacer" }),
        h("span", { class: "muted mono" }, p.stream)),
      h("div", { class: "kpis" }, Object.values(k).map((x) => x.el)),
      h("div", { class: "chart-box" },
        h("div", { class: "chart-head" },
          h("div", { class: "legend" },
            h("span", { class: "delivered" }, "delivered/s", legend.delivered),
            h("span", { class: "retries" }, "retries/s", legend.retries),
            h("span", { class: "dead" }, "dead letters/s", legend.dead),
            h("span", { class: "fleet", title: "entries finished by every gateway of the platform (from the group's read counter and pending count, sampled while this page is open)" },
              "fleet finished/s", legend.fleet)),
          h("div", { class: "spacer" }),
          h("span", { class: "muted", "data-chart-note": "" }, "solid: this gateway · dashed: the whole fleet")),
        canvas),
      h("div", { class: "panes" }, gwPane, gapPane, limitsPane));
    return { el, k, ready, reason, legend, canvas, gwBody, gapBody, gapNone, gapTable, limitsList };
  }

  function setKpi(x, value, text, sub, level) {
    x.v.textContent = text;
    x.el.dataset.value = value === null || value === undefined ? "" : String(value);
    x.s.textContent = sub || "";
    x.el.classList.remove("ok", "warn", "bad");
    if (level) x.el.classList.add(level);
  }

  function renderOverview() {
    const ov = state.ov;
    const root = $("#platforms");
    if (!ov.platforms.length) {
      root.replaceChildren(h("p", { class: "empty" }, "This gateway is starting its platforms…"));
      state.cards.clear();
      return;
    }
    if (!state.cards.size) root.replaceChildren();
    const names = new Set(ov.platforms.map((p) => p.platform));
    for (const [name, card] of state.cards) {
      if (!names.has(name)) {
        card.el.remove();
        state.cards.delete(name);
      }
    }
    for (const p of ov.platforms) {
      let card = state.cards.get(p.platform);
      if (!card) {
        card = buildCard(p);
        state.cards.set(p.platform, card);
        root.append(card.el);
      }
      card.p = p;
      fillCard(card, p);
      drawCard(p.platform, card);
    }
  }

  function fillCard(c, p) {
    const down = p.ready === false;
    c.el.classList.toggle("down", down);
    c.ready.className = `pill ${p.ready === null ? "" : down ? "bad" : "ok"}`;
    c.ready.textContent = p.ready === null ? "starting" : down ? "not ready" : "ready";
    c.ready.dataset.ready = p.ready === null ? "starting" : String(p.ready);
    c.reason.textContent = p.not_ready_reason || "";
    setKpi(c.k.stream, p.stream_length, fmtNum(p.stream_length), p.group_exists ? "entries" : "no group yet");
    const lagText = !p.group_exists ? "no group" : p.lag === null ? "?" : fmtNum(p.lag);
    setKpi(c.k.lag, p.lag, lagText, "unread", p.lag > 0 ? "warn" : "");
    setKpi(c.k.pending, p.pending, fmtNum(p.pending), "read, unfinished");
    const o = p.oldest_pending;
    setKpi(c.k.oldest, o ? o.age_ms : null, o ? fmtMs(o.age_ms) : "–",
      o ? `${o.id} on ${o.consumer}` : "nothing pending",
      o ? (o.age_ms > 300000 ? "bad" : o.age_ms > 60000 ? "warn" : "") : "");
    setKpi(c.k.dlq, p.dead_letters, fmtNum(p.dead_letters), p.dead_letters ? "open the list →" : "none",
      p.dead_letters > 0 ? "bad" : "ok");
    setKpi(c.k.gaps, p.gap_channels.length, fmtNum(p.gap_channels.length),
      p.gap_channels.length ? "channels held" : "none", p.gap_channels.length ? "warn" : "");
    const live = p.gateways.filter((g) => g.health === "live").length;
    const bad = p.gateways.some((g) => g.health === "dead" || g.health === "stalled");
    setKpi(c.k.gateways, p.gateways.length, `${live}/${p.gateways.length}`, "live / known",
      bad ? "bad" : live ? "ok" : "warn");

    c.gwBody.replaceChildren(...p.gateways.map((g) => h("tr", { "data-gateway": g.name, "data-health": g.health },
      h("td", { class: "mono" }, h("span", { class: `dot ${g.health}` }), g.name, g.this_node ? h("span", { class: "muted" }, " (this)") : null),
      h("td", { title: healthHelp(g.health) }, g.health),
      h("td", { class: "num" }, fmtNum(g.pending)),
      h("td", { class: "num" }, g.idle_ms === null ? "–" : fmtMs(g.idle_ms)),
      h("td", { class: "num", title: g.beat === null ? "no heartbeat counter" : `counter ${g.beat}` },
        g.beat_still_ms === null ? "–" : g.beat_still_ms < 1000 ? "moving" : `still ${fmtMs(g.beat_still_ms)}`))));
    if (!p.gateways.length) c.gwBody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No gateway has joined the group yet.")));

    const gaps = p.gap_channels;
    c.gapNone.hidden = gaps.length > 0;
    c.gapTable.hidden = gaps.length === 0;
    c.gapBody.replaceChildren(...gaps.map((g) => h("tr", { "data-gap": g.channel, "data-seq": g.waiting_for_seq },
      h("td", { class: "mono" }, g.channel),
      h("td", { class: "num" }, g.waiting_for_seq),
      h("td", { class: "num" }, g.done_seq),
      h("td", { class: "num", title: `since ${iso(g.since_ms)}` }, fmtMs(g.waiting_ms)),
      h("td", { class: "muted" }, gapWhy(g, p)))));

    const lim = p.limits.filter((x) => x.value > 0);
    const items = [];
    items.push(h("div", { class: "limit" },
      h("span", { class: `pill ${down ? "bad" : p.ready === null ? "" : "ok"}`, "data-circuit": down ? "open" : "closed" },
        down ? "circuit open" : "circuit closed"),
      " ", h("span", { class: "muted" }, down ? "sends wait until the platform accepts the credential" : "sends flow")));
    if (!lim.length) items.push(h("div", { class: "none" }, "No rate limit, gap skip or lease trouble since this gateway started."));
    for (const x of lim) {
      const labels = Object.entries(x.labels).map(([k, v]) => `${k}=${v}`).join(" ");
      items.push(h("div", { class: "limit", title: x.metric },
        h("span", { class: `badge ${/invalid|at_cap|locks_lost/.test(x.metric) ? "bad" : "warn"}` }, fmtNum(x.value)),
        " ", shortMetric(x.metric), labels ? h("span", { class: "muted" }, ` ${labels}`) : null));
    }
    c.limitsList.replaceChildren(...items);
  }

  function healthHelp(hl) {
    return {
      live: "registered, heartbeat moving",
      stalled: "registered, but its heartbeat stood still for the node lease: its peers are about to declare it dead",
      dead: "no longer registered and entries still pending: a live gateway claims them",
      gone: "no longer registered, nothing pending: removed from the group by the next sweep",
    }[hl] || hl;
  }

  function gapWhy(g, p) {
    const owner = g.owner ? g.owner.replace(/\/[^/]*$/, "") : "no owner";
    const left = p.gap_timeout_ms - g.waiting_ms;
    const when = left > 0
      ? `proof of absence checked in ${fmtMs(left)}`
      : "no proof yet that seq is absent: it exists somewhere, or the check repeats";
    return `seq ${g.waiting_for_seq} has not been finished (held by ${owner}); ${when}`;
  }

  function shortMetric(m) {
    return m.replace(/^stargazer_/, "").replace(/_total$/, "").replace(/_/g, " ");
  }

  // ------------------------------------------------------------ charts

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function niceMax(x) {
    if (x <= 1) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (x <= m * p) return m * p;
    return 10 * p;
  }

  function drawCard(name, card) {
    const series = state.rates && state.rates.platforms.find((s) => s.platform === name);
    const last = (a) => (a && a.length ? a[a.length - 1] : 0);
    if (series) {
      card.legend.delivered.textContent = fmtRate(last(series.delivered));
      card.legend.retries.textContent = fmtRate(last(series.retries));
      card.legend.dead.textContent = fmtRate(last(series.dead_lettered));
      card.legend.fleet.textContent = series.fleet_t.length ? fmtRate(last(series.fleet_finished)) : "–";
      setKpi(card.k.rate, last(series.delivered), fmtRate(last(series.delivered)),
        `${fmtNum(series.totals.delivered)} since start`);
    }
    drawChart(card.canvas, series, state.rates ? state.rates.at_ms : Date.now());
  }

  function drawChart(canvas, s, nowMs) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600;
    const hgt = canvas.clientHeight || 140;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(hgt * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(hgt * dpr);
    }
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, hgt);
    const span = state.window === "hour" ? 3600000 : 60000;
    const left = 44, right = 8, top = 8, bottom = 18;
    const pw = w - left - right, ph = hgt - top - bottom;
    const lines = s ? [
      ["--c-delivered", s.delivered, true],
      ["--c-retries", s.retries, false],
      ["--c-dead", s.dead_lettered, false],
    ] : [];
    let max = 0;
    for (const [, v] of lines) for (const x of v) max = Math.max(max, x);
    if (s) for (const x of s.fleet_finished) max = Math.max(max, x);
    const ymax = niceMax(max);
    const X = (t) => left + pw * (1 - (nowMs - t) / span);
    const Y = (v) => top + ph * (1 - v / ymax);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = cssVar("--muted");
    g.strokeStyle = cssVar("--line");
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      const y = Math.round(Y(v)) + 0.5;
      g.beginPath();
      g.moveTo(left, y);
      g.lineTo(w - right, y);
      g.stroke();
      g.fillText(fmtRate(v), left - 6, y);
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    const ticks = state.window === "hour" ? [60, 45, 30, 15, 0] : [60, 45, 30, 15, 0];
    const unit = state.window === "hour" ? "m" : "s";
    for (const t of ticks) {
      const x = left + pw * (1 - t / 60);
      g.fillText(t === 0 ? "now" : `-${t}${unit}`, Math.min(Math.max(x, left + 10), w - right - 12), hgt - bottom + 4);
    }
    canvas.dataset.draws = String(Number(canvas.dataset.draws || 0) + 1);
    canvas.dataset.points = s ? String(s.t.length) : "0";
    canvas.dataset.moving = s ? String(s.delivered.filter((x) => x > 0).length) : "0";
    if (!s || !s.t.length) {
      g.textAlign = "center";
      g.textBaseline = "middle";
      g.fillText("collecting samples…", left + pw / 2, top + ph / 2);
      return;
    }
    g.save();
    g.beginPath();
    g.rect(left, top - 2, pw, ph + 4);
    g.clip();
    for (const [color, v, fill] of lines) {
      const c = cssVar(color);
      g.beginPath();
      let started = false;
      for (let i = 0; i < s.t.length; i++) {
        const x = X(s.t[i]), y = Y(v[i]);
        if (!started) {
          g.moveTo(x, y);
          started = true;
        } else g.lineTo(x, y);
      }
      g.strokeStyle = c;
      g.lineWidth = 1.75;
      g.lineJoin = "round";
      g.stroke();
      if (fill && s.t.length > 1) {
        g.lineTo(X(s.t[s.t.length - 1]), Y(0));
        g.lineTo(X(s.t[0]), Y(0));
        g.closePath();
        g.globalAlpha = 0.12;
        g.fillStyle = c;
        g.fill();
        g.globalAlpha = 1;
      }
    }
    if (s.fleet_t.length > 1) {
      g.beginPath();
      s.fleet_t.forEach((t, i) => {
        const x = X(t), y = Y(s.fleet_finished[i]);
        if (i === 0) g.moveTo(x, y);
        else g.lineTo(x, y);
      });
      g.setLineDash([5, 4]);
      g.strokeStyle = cssVar("--c-fleet");
      g.lineWidth = 1.5;
      g.stroke();
      g.setLineDash([]);
    }
    g.restore();
  }

  // ------------------------------------------------------------ dead letters

  function syncPlatformSelect() {
    const sel = $("#f-platform");
    const names = state.ov ? state.ov.platforms.map((p) => p.platform) : [];
    if (state.dlq.platform && !names.includes(state.dlq.platform)) names.unshift(state.dlq.platform);
    const have = $$("option", sel).map((o) => o.value);
    if (have.join("\n") !== names.join("\n")) {
      sel.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
    }
    if (!state.dlq.platform && names.length) {
      state.dlq.platform = names[0];
      loadDlq();
    }
    sel.value = state.dlq.platform || "";
  }

  /** datetime-local (local time) → a stream id bound in ms. */
  function localToMs(v) {
    if (!v) return "";
    const t = new Date(v).getTime();
    return Number.isFinite(t) ? String(t) : "";
  }

  function dlqQuery() {
    const d = state.dlq;
    const q = new URLSearchParams();
    q.set("limit", PAGE);
    if (d.kind) q.set("kind", d.kind);
    if (d.channel) q.set("channel", d.channel);
    if (d.since) q.set("since", localToMs(d.since));
    if (d.until) q.set("until", localToMs(d.until));
    if (d.before) q.set("before", d.before);
    return q;
  }

  async function loadDlq(opts = {}) {
    const d = state.dlq;
    if (!d.platform) return;
    d.loading = true;
    const r = await api(`platforms/${enc(d.platform)}/dlq?${dlqQuery()}`);
    d.loading = false;
    if (!r.ok) {
      $("#dlq-summary").textContent = r.body.error;
      if (!opts.quiet) toast(r.body.error, "bad");
      return;
    }
    d.page = r.body;
    const ids = new Set(r.body.entries.map((e) => e.id));
    for (const id of d.sel) if (!ids.has(id)) d.sel.delete(id);
    renderDlq();
  }

  function kindLevel(k) {
    if (k === "retries_exhausted" || k === "unknown_outcome" || k === "lost_in_stream") return "warn";
    return "bad";
  }

  function renderDlq() {
    const d = state.dlq;
    const pg = d.page;
    const now = Date.now();
    const rows = pg.entries.map((e) => {
      const ck = h("input", { type: "checkbox", "aria-label": `select ${e.id}`, "data-ck": e.id });
      ck.checked = d.sel.has(e.id);
      ck.addEventListener("click", (ev) => {
        ev.stopPropagation();
        if (ck.checked) d.sel.add(e.id);
        else d.sel.delete(e.id);
        tr.classList.toggle("sel", ck.checked);
        renderSelection();
      });
      const tr = h("tr", { "data-id": e.id, class: [d.sel.has(e.id) ? "sel" : "", d.open === e.id ? "open" : ""].join(" ") },
        h("td", { class: "ck" }, ck),
        h("td", { class: "when", title: iso(e.failed_ms) }, `${fmtMs(Math.max(0, now - e.failed_ms))} ago`),
        h("td", {}, h("span", { class: `badge ${kindLevel(e.error_kind)}` }, e.error_kind || "?")),
        h("td", { class: "mono" }, e.channel_id || "–", e.seq ? h("span", { class: "muted" }, ` #${e.seq}`) : null),
        h("td", {}, e.type || h("span", { class: "muted" }, "not json")),
        h("td", { class: "content" },
          h("div", { class: "preview" }, e.preview || h("span", { class: "muted" }, "–")),
          h("div", { class: "error", title: e.error }, e.error)),
        h("td", { class: "num" }, e.attempts),
        h("td", { class: "id" }, e.id));
      tr.addEventListener("click", () => openDetail(e.id));
      return tr;
    });
    if (!rows.length) {
      rows.push(h("tr", {}, h("td", { colspan: 8, class: "empty" },
        pg.total ? "No dead letter matches." : "The dead-letter stream is empty. Nothing failed.")));
    }
    $("#dlq-rows").replaceChildren(...rows);
    const filtered = d.kind || d.channel || d.since || d.until;
    $("#dlq-summary").textContent = `${fmtNum(pg.total)} dead letter${pg.total === 1 ? "" : "s"} on ${d.platform}` +
      (filtered ? ` · ${pg.entries.length} match${pg.entries.length === 1 ? "" : "es"} on this page (${fmtNum(pg.scanned)} read)` : "") +
      (pg.partial ? " · stopped after a full scan budget, older ones may match" : "") +
      ` · ${pg.took_ms.toFixed(1)} ms`;
    $("#pg-newer").disabled = d.stack.length === 0;
    $("#pg-older").disabled = !pg.next_before;
    $("#pg-info").textContent = `page ${d.stack.length + 1}`;
    renderSelection();
    if (state.firstDlqRender) {
      state.firstDlqRender = false;
      document.body.dataset.dlqReadyMs = performance.now().toFixed(1);
    }
    document.body.dataset.dlqRenders = String(Number(document.body.dataset.dlqRenders || 0) + 1);
  }

  function renderSelection() {
    const d = state.dlq;
    const n = d.sel.size;
    $("#sel-count").textContent = n ? `${n} selected` : "";
    $("#act-replay").disabled = n === 0;
    $("#act-purge").disabled = n === 0;
    const pageIds = d.page ? d.page.entries.map((e) => e.id) : [];
    const all = $("#ck-all");
    all.checked = pageIds.length > 0 && pageIds.every((id) => d.sel.has(id));
    all.indeterminate = !all.checked && pageIds.some((id) => d.sel.has(id));
  }

  function jsonNode(v) {
    // Pretty JSON with keys, strings and numbers coloured; text nodes only.
    const text = JSON.stringify(v, null, 2);
    const pre = h("pre", { class: "json" });
    const re = /("(?:\\.|[^"\\])*")(\s*:)?|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(true|false|null)/g;
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) pre.append(text.slice(last, m.index));
      if (m[1]) {
        pre.append(h("span", { class: m[2] ? "k" : "s" }, m[1]));
        if (m[2]) pre.append(m[2]);
      } else pre.append(h("span", { class: "n" }, m[0]));
      last = re.lastIndex;
    }
    pre.append(text.slice(last));
    return pre;
  }

  async function openDetail(id) {
    const d = state.dlq;
    d.open = id;
    $$("#dlq-rows tr").forEach((tr) => tr.classList.toggle("open", tr.dataset.id === id));
    const drawer = $("#detail");
    drawer.hidden = false;
    document.body.classList.add("drawer-open");
    drawer.dataset.id = id;
    $("#d-title").textContent = id;
    $("#d-body").replaceChildren(h("p", { class: "muted" }, "Loading…"));
    const r = await api(`platforms/${enc(d.platform)}/dlq/${enc(id)}`);
    if (d.open !== id) return;
    if (!r.ok) {
      $("#d-body").replaceChildren(h("p", { class: "err" }, r.body.error));
      $("#d-replay").disabled = true;
      $("#d-purge").disabled = true;
      return;
    }
    const e = r.body;
    const field = (k, v) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "–" : String(v))];
    const body = [
      h("dl", { class: "fields" },
        field("kind", e.error_kind),
        field("attempts", e.attempts),
        field("channel", e.channel_id),
        field("seq", e.seq),
        field("original id", e.original_id),
        field("consumer", e.consumer),
        field("failed", `${iso(e.failed_ms)} (${fmtMs(Date.now() - e.failed_ms)} ago)`),
        field("signed", e.signed ? "yes" : "no"),
        field("replay", e.replay.possible ? `possible, idempotency key ${e.replay.idempotency_key}` : `not possible: ${e.replay.reason}`)),
      h("h3", {}, "Error"),
      h("div", { class: "errbox" }, e.error || "(no message)"),
      h("h3", {}, "History"),
      h("ol", { class: "timeline" }, e.history.map((s, i) => h("li", { class: i === e.history.length - 1 ? "fail" : "" },
        h("div", { class: "t" }, iso(s.at_ms)), s.what))),
      h("h3", {}, "Envelope"),
      e.envelope !== null ? jsonNode(e.envelope) : h("pre", { class: "json" }, e.payload_text || "(empty payload)"),
    ];
    $("#d-body").replaceChildren(...body);
    $("#d-replay").disabled = !e.replay.possible;
    $("#d-purge").disabled = false;
  }

  function closeDetail() {
    state.dlq.open = null;
    $("#detail").hidden = true;
    document.body.classList.remove("drawer-open");
    $$("#dlq-rows tr.open").forEach((tr) => tr.classList.remove("open"));
  }

  // ------------------------------------------------------------ actions

  function confirmDialog(title, lines, okText, danger) {
    return new Promise((resolve) => {
      const dlg = $("#confirm-dialog");
      $("#c-title").textContent = title;
      $("#c-body").replaceChildren(...lines.map((l) => (l instanceof Node ? l : h("p", {}, l))));
      const ok = $("#c-ok");
      ok.textContent = okText;
      ok.classList.toggle("danger", !!danger);
      const done = (v) => {
        ok.onclick = null;
        $("#c-cancel").onclick = null;
        dlg.close();
        resolve(v);
      };
      ok.onclick = () => done(true);
      $("#c-cancel").onclick = () => done(false);
      dlg.oncancel = () => done(false);
      dlg.showModal();
    });
  }

  function refused(r) {
    toast(`Refused (${r.status}): ${r.body.error}`, "bad");
    if (r.status === 401) openToken(r.body.error);
  }

  /** Dry run, confirm with its counts, then act; `sel` is {ids}, {filter} or {all}. */
  async function act(kind, sel, what) {
    const d = state.dlq;
    const path = `platforms/${enc(d.platform)}/dlq/${kind}`;
    const dry = await api(path, { method: "POST", body: { ...sel, dry_run: true }, auth: true });
    if (!dry.ok) return refused(dry);
    let lines;
    let n;
    if (kind === "replay") {
      n = dry.body.replayed.length;
      lines = [`${n} dead letter${n === 1 ? "" : "s"} will be moved back to the outbound stream, each with its original idempotency key and without its seq.`];
      if (dry.body.skipped.length) {
        lines.push(h("p", { class: "err" }, `${dry.body.skipped.length} cannot be replayed:`));
        lines.push(h("ul", {}, dry.body.skipped.slice(0, 8).map((s) => h("li", {}, h("code", {}, s.dlq_id), ` ${s.reason}`))));
      }
    } else {
      n = dry.body.selected;
      lines = [`${n} dead letter${n === 1 ? "" : "s"} will be deleted for good.`];
    }
    if (n === 0) return toast(`Nothing to ${kind} in ${what}.`);
    const go = await confirmDialog(`${kind === "replay" ? "Replay" : "Purge"} ${what}?`, lines,
      kind === "replay" ? `Replay ${n}` : `Delete ${n}`, kind === "purge");
    if (!go) return;
    const r = await api(path, { method: "POST", body: sel, auth: true });
    if (!r.ok) return refused(r);
    if (kind === "replay") {
      toast(`Replayed ${r.body.replayed.length}${r.body.skipped.length ? `, skipped ${r.body.skipped.length}` : ""}.`, "ok");
    } else {
      toast(`Deleted ${r.body.deleted} of ${r.body.selected}.`, "ok");
    }
    for (const x of sel.ids || []) d.sel.delete(x);
    if (sel.ids && sel.ids.includes(d.open)) closeDetail();
    if (!sel.ids) {
      d.sel.clear();
      closeDetail();
    }
    await loadDlq({ quiet: true });
    pollOverview();
  }

  function bulkSelection() {
    const d = state.dlq;
    if (d.until) {
      toast("A “To” bound cannot be used for replaying or purging all matches: tick the rows instead.", "bad");
      return null;
    }
    const f = {};
    if (d.kind) f.kind = d.kind;
    if (d.channel) f.channel = d.channel;
    if (d.since) f.since = localToMs(d.since);
    if (!Object.keys(f).length) return [{ all: true }, "every dead letter of " + d.platform];
    return [{ filter: f }, "all dead letters matching the filter"];
  }

  // ------------------------------------------------------------ token

  function openToken(err) {
    const dlg = $("#token-dialog");
    $("#t-token").value = token();
    $("#t-operator").value = operator();
    $("#t-error").hidden = !err;
    $("#t-error").textContent = err || "";
    if (!dlg.open) dlg.showModal();
    $("#t-token").focus();
  }

  async function saveToken(ev) {
    ev.preventDefault();
    const t = $("#t-token").value.trim();
    const op = $("#t-operator").value.trim();
    if (op) sessionStorage.setItem(OPERATOR_KEY, op);
    else sessionStorage.removeItem(OPERATOR_KEY);
    const prev = token();
    sessionStorage.setItem(TOKEN_KEY, t);
    const r = await api("auth", { method: "POST", body: {}, auth: true });
    if (!r.ok) {
      if (prev) sessionStorage.setItem(TOKEN_KEY, prev);
      else sessionStorage.removeItem(TOKEN_KEY);
      $("#t-error").hidden = false;
      $("#t-error").textContent = r.body.error;
      return;
    }
    $("#token-dialog").close();
    toast("Actions unlocked for this tab.", "ok");
    if (state.ov) renderHeader();
  }

  // ------------------------------------------------------------ views, polling

  function route() {
    const hash = location.hash.replace(/^#/, "");
    const [view, qs] = hash.split("?");
    state.view = view === "dlq" ? "dlq" : "overview";
    $("#view-overview").hidden = state.view !== "overview";
    $("#view-dlq").hidden = state.view !== "dlq";
    $("#tab-overview").classList.toggle("on", state.view === "overview");
    $("#tab-dlq").classList.toggle("on", state.view === "dlq");
    if (state.view !== "dlq") closeDetail();
    if (state.view === "dlq") {
      const q = new URLSearchParams(qs || "");
      const d = state.dlq;
      const p = q.get("platform");
      const changed = p && p !== d.platform;
      if (p) d.platform = p;
      for (const k of ["kind", "channel"]) if (q.has(k)) d[k] = q.get(k);
      $("#f-kind").value = d.kind;
      $("#f-channel").value = d.channel;
      syncPlatformSelect();
      if (changed || !d.page) {
        d.before = null;
        d.stack = [];
        d.sel.clear();
        loadDlq();
      }
    }
  }

  let timers = [];
  function schedule() {
    timers.forEach(clearInterval);
    timers = [];
    if (document.hidden) return; // nobody watches: poll nothing
    pollOverview();
    pollRates();
    timers.push(setInterval(pollOverview, OVERVIEW_EVERY));
    timers.push(setInterval(pollRates, state.window === "hour" ? 10000 : OVERVIEW_EVERY));
    timers.push(setInterval(() => {
      const d = state.dlq;
      if (state.view === "dlq" && !d.loading && d.stack.length === 0 && d.sel.size === 0) loadDlq({ quiet: true });
    }, DLQ_EVERY));
  }

  function wire() {
    window.addEventListener("hashchange", route);
    document.addEventListener("visibilitychange", schedule);
    window.addEventListener("resize", () => {
      for (const [name, card] of state.cards) drawCard(name, card);
    });
    $$("[data-window]").forEach((b) => b.addEventListener("click", () => {
      state.window = b.dataset.window;
      $$("[data-window]").forEach((x) => x.classList.toggle("on", x === b));
      state.rates = null;
      schedule();
    }));
    $("#dlq-filter").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const d = state.dlq;
      d.platform = $("#f-platform").value;
      d.kind = $("#f-kind").value.trim();
      d.channel = $("#f-channel").value.trim();
      d.since = $("#f-since").value;
      d.until = $("#f-until").value;
      d.before = null;
      d.stack = [];
      d.sel.clear();
      closeDetail();
      loadDlq();
    });
    $("#f-platform").addEventListener("change", () => $("#f-search").click());
    $("#f-clear").addEventListener("click", () => {
      for (const id of ["#f-kind", "#f-channel", "#f-since", "#f-until"]) $(id).value = "";
      $("#f-search").click();
    });
    $("#pg-older").addEventListener("click", () => {
      const d = state.dlq;
      if (!d.page || !d.page.next_before) return;
      d.stack.push(d.before);
      d.before = d.page.next_before;
      loadDlq();
    });
    $("#pg-newer").addEventListener("click", () => {
      const d = state.dlq;
      if (!d.stack.length) return;
      d.before = d.stack.pop();
      loadDlq();
    });
    $("#ck-all").addEventListener("change", (ev) => {
      const d = state.dlq;
      for (const e of d.page ? d.page.entries : []) {
        if (ev.target.checked) d.sel.add(e.id);
        else d.sel.delete(e.id);
      }
      renderDlq();
    });
    $("#act-replay").addEventListener("click", () => {
      const ids = [...state.dlq.sel];
      act("replay", { ids }, `${ids.length} selected`);
    });
    $("#act-purge").addEventListener("click", () => {
      const ids = [...state.dlq.sel];
      act("purge", { ids }, `${ids.length} selected`);
    });
    $("#act-replay-all").addEventListener("click", () => {
      const s = bulkSelection();
      if (s) act("replay", s[0], s[1]);
    });
    $("#act-purge-all").addEventListener("click", () => {
      const s = bulkSelection();
      if (s) act("purge", s[0], s[1]);
    });
    $("#d-close").addEventListener("click", closeDetail);
    $("#d-replay").addEventListener("click", () => {
      const id = state.dlq.open;
      if (id) act("replay", { ids: [id] }, id);
    });
    $("#d-purge").addEventListener("click", () => {
      const id = state.dlq.open;
      if (id) act("purge", { ids: [id] }, id);
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && !$("#detail").hidden && !document.querySelector("dialog[open]")) closeDetail();
    });
    $("#token-btn").addEventListener("click", () => openToken());
    $("#token-form").addEventListener("submit", saveToken);
    $("#t-cancel").addEventListener("click", () => $("#token-dialog").close());
    $("#t-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("#token-dialog").close();
      toast("Token forgotten: actions are locked again.");
      if (state.ov) renderHeader();
    });
  }

  wire();
  route();
  schedule();
})();
