// The built-in dashboard. Plain JS, no dependencies: reads /api/ and draws
// tables and SVG charts. Data is only ever inserted with textContent and
// setAttribute (never parsed as HTML). Computed numbers are also written to
// data-* attributes, which the browser test reads from the dumped DOM.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_CHART_CLIENTS = 8;
const page = { selected: null, timer: null, previousHealth: null, refreshes: 0, busy: false };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
}

// The server answers at most api_max_concurrent requests at once and sheds
// the rest with 503 "busy" and a Retry-After: wait that long and ask again,
// a few times, before calling it an error.
const BUSY_RETRIES = 5;

async function api(path, params) {
  const query = new URLSearchParams(params || {}).toString();
  for (let attempt = 0; ; attempt++) {
    const response = await fetch("/api/" + path + (query ? "?" + query : ""), { cache: "no-store" });
    const body = await response.json();
    if (response.status === 503 && body.error === "busy" && attempt < BUSY_RETRIES) {
      const seconds = Number(response.headers.get("Retry-After")) || 1;
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      continue;
    }
    if (!response.ok) throw new Error(path + ": " + (body.reason || response.status));
    return body;
  }
}

// ---- formatting ----------------------------------------------------------------

function num(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function int(value) {
  return num(value, 0);
}

// Enough digits to tell values apart, without noise.
function value(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return num(v, a >= 1000 ? 1 : a >= 100 ? 2 : a >= 1 ? 3 : 4);
}

function age(ms) {
  if (ms === null || ms === undefined) return "never";
  const s = Math.max(0, ms / 1000);
  if (s < 90) return num(s, 0) + " s ago";
  if (s < 5400) return num(s / 60, 0) + " min ago";
  if (s < 172800) return num(s / 3600, 1) + " h ago";
  return num(s / 86400, 1) + " d ago";
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return num(s, 1) + " s";
  if (s < 5400) return num(s / 60, 1) + " min";
  if (s < 172800) return num(s / 3600, 1) + " h";
  return num(s / 86400, 1) + " d";
}

function clock(ms) {
  const d = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  return two(d.getHours()) + ":" + two(d.getMinutes());
}

function stamp(ms) {
  const d = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " + clock(ms) + ":" + two(d.getSeconds());
}

// ---- health --------------------------------------------------------------------

function tile(metric, dataValue, label, shown, sub, level) {
  return el("div", { class: "tile" + (level ? " " + level : ""), "data-metric": metric, "data-value": dataValue },
    el("div", { class: "label" }, label), el("div", { class: "value" }, shown), el("div", { class: "sub" }, sub || ""));
}

function renderHealth(h) {
  const prev = page.previousHealth;
  const dt = prev ? (h.now_ms - prev.now_ms) / 1000 : 0;
  const rate = (key) => (prev && dt > 0 ? (h[key] - prev[key]) / dt : null);
  const rateText = (key) => (rate(key) === null ? "" : num(rate(key), 1) + " /s now");
  let latency = h.insert_mean_ms;
  let latencySub = "mean since start";
  if (prev && h.insert_count > prev.insert_count) {
    latency = ((h.insert_seconds_sum - prev.insert_seconds_sum) / (h.insert_count - prev.insert_count)) * 1000;
    latencySub = "mean over the last " + num(dt, 0) + " s";
  }
  const reasons = Object.entries(h.dead_letters_by_reason).map(([r, n]) => r + " " + n).join(", ");
  const tiles = document.getElementById("tiles");
  tiles.replaceChildren(
    tile("received_readings", h.received_readings, "received readings", int(h.received_readings), rateText("received_readings")),
    tile("inserted_readings", h.inserted_readings, "stored readings", int(h.inserted_readings), rateText("inserted_readings")),
    tile("duplicate_readings", h.duplicate_readings, "duplicates skipped", int(h.duplicate_readings),
      int(h.duplicate_messages) + " whole messages"),
    tile("dead_letters", h.dead_letters, "dead letters", int(h.dead_letters), reasons, h.dead_letters > 0 ? "bad" : ""),
    tile("insert_mean_ms", latency === null ? "" : latency, "insert latency", latency === null ? "–" : num(latency, 1) + " ms",
      latencySub + " · " + int(h.batches) + " batches"),
    tile("unacked_messages", h.unacked_messages, "unacked messages", int(h.unacked_messages),
      int(h.inflight_inserts) + " inserts in flight", h.unacked_messages > 1000 ? "warn" : ""),
    tile("insert_retries", h.insert_retries, "ClickHouse retries", int(h.insert_retries),
      int(h.rollup_errors) + " rollup errors", h.insert_retries > 0 ? "warn" : ""),
    tile("subscribed", h.subscribed ? 1 : 0, "MQTT", h.subscribed ? "subscribed" : "not subscribed",
      int(h.mqtt_connection_errors) + " connection errors", h.subscribed ? "" : "bad"),
    tile("clickhouse", h.clickhouse.reachable ? 1 : 0, "ClickHouse", h.clickhouse.reachable ? h.clickhouse.version : "unreachable",
      h.clickhouse.database + " · " + h.clickhouse.flavor + " schema", h.clickhouse.reachable ? "" : "bad"),
    tile("uptime_s", h.uptime_s, "uptime", duration(h.uptime_s), int(h.acked_messages) + " messages acked"),
  );
  page.previousHealth = h;
}

// ---- fleet ---------------------------------------------------------------------

function freshness(ageMs) {
  if (ageMs === null) return "bad";
  return ageMs < 30000 ? "ok" : ageMs < 300000 ? "warn" : "bad";
}

const known = (v) => v !== null && v !== undefined;

// The backlog's outlook from an agent's status. Older agents send none of
// these fields: "–" (unknown). An outbox with rows that is not shrinking
// (the agent sends a rate but no ETA) is "stalled".
function drainCells(s) {
  const rate = s && known(s.drain_per_s) ? s.drain_per_s : null;
  const stalled = rate !== null && s.outbox_rows > 0 && !known(s.drain_eta_s);
  let eta = "–";
  if (stalled) eta = "stalled";
  else if (s && s.outbox_rows > 0 && known(s.drain_eta_s)) eta = duration(s.drain_eta_s);
  return [
    el("td", { "data-col": "drain", class: stalled ? "bad" : "" }, rate === null ? "–" : num(rate, 1) + " /s"),
    el("td", { "data-col": "drain-eta", class: stalled ? "bad" : "", title: stalled ? "rows wait and the outbox is not shrinking" : null },
      eta),
    el("td", { "data-col": "bytes-per-reading" },
      s && known(s.bytes_per_reading) ? num(s.bytes_per_reading, 1) + " B" : "–"),
  ];
}

// Echo mode only (the fields are absent in ingest mode and from older agents):
// whether an ingest server is announced, batches held for want of one, and
// readings only the broker holds. Compact text, one cell.
function echoCell(s) {
  const parts = [];
  let level = "";
  if (s && known(s.ingest_present)) {
    parts.push(s.ingest_present ? "ingest" : "no ingest");
    if (!s.ingest_present) level = "bad";
  }
  if (s && known(s.echo_held_batches)) {
    parts.push(int(s.echo_held_batches) + " held");
    if (s.echo_held_batches > 0 && !level) level = "warn";
  }
  if (s && known(s.echo_ahead_readings)) parts.push(int(s.echo_ahead_readings) + " ahead");
  return el("td", { "data-col": "echo", class: level }, parts.length ? parts.join(" · ") : "–");
}

// The last remote command the agent answered (absent before its first one
// and from older agents: "–"): its name, ✓ or ✗ and how long ago; a failure
// also shows the start of its summary. The whole summary, the id and the
// time are the cell's tooltip. Text only: the summary comes from the device.
const SUMMARY_SHOWN = 60;

function lastCommandCell(s, nowMs) {
  const c = s && known(s.last_command) ? s.last_command : null;
  if (!c) return el("td", { "data-col": "last-command" }, "–");
  const summary = c.summary.length > SUMMARY_SHOWN ? c.summary.slice(0, SUMMARY_SHOWN - 1) + "…" : c.summary;
  const text = c.name + " " + (c.ok ? "✓" : "✗") + " · " + age(nowMs - c.ts_ms) + (c.ok ? "" : " · " + summary);
  return el("td", {
    "data-col": "last-command", class: c.ok ? "" : "bad",
    title: c.name + " (id " + c.id + ") at " + stamp(c.ts_ms) + ": " + c.summary,
  }, text);
}

function renderFleet(fleet) {
  const table = document.getElementById("fleet-table");
  setAttrs(table, {
    "data-now-ms": fleet.now_ms, "data-window-s": fleet.window_s, "data-from-ms": fleet.from_ms,
    "data-clients": fleet.clients.length,
  });
  document.getElementById("fleet-count").textContent = fleet.clients.length + " clients";
  const rows = fleet.clients.map((c) => {
    const s = c.status;
    const ageMs = c.last_seen_ms === null ? null : fleet.now_ms - c.last_seen_ms;
    const row = el("tr", {
      class: "selectable" + (c.client_id === page.selected ? " selected" : ""),
      "data-client": c.client_id,
      "data-last-seen-ms": c.last_seen_ms,
      "data-recent-readings": c.recent_readings,
      "data-readings-per-s": c.readings_per_s,
      "data-outbox-rows": s ? s.outbox_rows : null,
      "data-oldest-age-s": s ? s.oldest_age_s : null,
      "data-connected": s ? (s.connected ? 1 : 0) : null,
      "data-drain-per-s": s ? s.drain_per_s : null,
      "data-drain-eta-s": s ? s.drain_eta_s : null,
      "data-bytes-per-reading": s ? s.bytes_per_reading : null,
      "data-ingest-present": s && known(s.ingest_present) ? (s.ingest_present ? 1 : 0) : null,
      "data-echo-held-batches": s ? s.echo_held_batches : null,
      "data-echo-ahead-readings": s ? s.echo_ahead_readings : null,
      "data-last-command-id": s && s.last_command ? s.last_command.id : null,
      "data-last-command-ok": s && s.last_command ? (s.last_command.ok ? 1 : 0) : null,
      "data-last-command-ts-ms": s && s.last_command ? s.last_command.ts_ms : null,
    },
      el("td", {}, c.client_id),
      el("td", { class: freshness(ageMs), title: c.last_seen_ms ? stamp(c.last_seen_ms) : "" }, age(ageMs)),
      el("td", {}, num(c.readings_per_s, 2)),
      el("td", {}, s ? num(s.received_per_s, 1) : "–"),
      el("td", {}, s ? num(s.confirmed_per_s, 1) : "–"),
      el("td", { "data-col": "outbox-rows", class: s && s.outbox_rows > 0 ? "warn" : "" }, s ? int(s.outbox_rows) : "–"),
      el("td", { "data-col": "oldest-age" }, s ? duration(s.oldest_age_s) : "–"),
      ...drainCells(s),
      echoCell(s),
      lastCommandCell(s, fleet.now_ms),
      el("td", { class: s ? (s.connected ? "ok" : "bad") : "" }, s ? (s.connected ? "connected" : "offline") : "no status"),
      el("td", {}, String(c.sensors.length)),
    );
    row.addEventListener("click", () => {
      page.selected = c.client_id;
      refreshSoon();
    });
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
  document.getElementById("fleet-note").textContent =
    "stored/s: distinct readings with a time in the whole minutes since " +
    new Date(fleet.from_ms).toISOString().slice(11, 16) + " UTC (from the rollup). " +
    (fleet.clients.length > MAX_CHART_CLIENTS ? "Click a client to chart it." : "");
}

// ---- charts --------------------------------------------------------------------

const W = 400, H = 150, LEFT = 46, RIGHT = 6, TOP = 6, BOTTOM = 18;

function chart(clientId, series, fromMs, minutes) {
  const points = series.points;
  const empty = points.length === 0;
  const count = points.reduce((n, p) => n + p.count, 0);
  const lo = empty ? null : Math.min(...points.map((p) => p.min));
  const hi = empty ? null : Math.max(...points.map((p) => p.max));
  const weighted = empty ? null : points.reduce((s, p) => s + p.avg * p.count, 0) / count;
  const figure = el("figure", {
    class: "chart", "data-client": clientId, "data-sensor": series.sensor, "data-points": points.length,
    "data-count": count, "data-min": lo, "data-max": hi, "data-avg": weighted, "data-from-ms": fromMs, "data-minutes": minutes,
  });
  figure.append(el("figcaption", {},
    el("span", { class: "name", title: series.sensor }, series.sensor),
    el("span", { class: "stats" }, int(count) + " readings · min " + value(lo) + " · avg " + value(weighted) + " · max " + value(hi))));
  const plot = svg("svg", { class: "plot", viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" });
  const title = svg("title", {});
  title.textContent = series.sensor + ": min, mean and max per minute over the last " + minutes + " minutes";
  plot.append(title);
  const spanMs = minutes * 60000;
  const pad = empty ? 1 : hi > lo ? (hi - lo) * 0.08 : Math.max(Math.abs(hi) * 0.05, 1);
  const y0 = (empty ? 0 : lo) - pad, y1 = (empty ? 0 : hi) + pad;
  const x = (t) => LEFT + ((t - fromMs) / spanMs) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - (v - y0) / (y1 - y0)) * (H - TOP - BOTTOM);
  for (const v of empty ? [] : [lo, (lo + hi) / 2, hi]) {
    plot.append(svg("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: LEFT - 4, y: y(v) + 3, "text-anchor": "end" });
    label.textContent = value(v);
    plot.append(label);
  }
  for (const [t, anchor] of [[fromMs, "start"], [fromMs + spanMs / 2, "middle"], [fromMs + spanMs, "end"]]) {
    const label = svg("text", { x: x(t), y: H - 4, "text-anchor": anchor });
    label.textContent = clock(t);
    plot.append(label);
  }
  const barWidth = Math.max(1, (W - LEFT - RIGHT) / minutes - 1);
  let line = "";
  let previous = null;
  for (const p of points) {
    const top = y(p.max), bottom = y(p.min);
    plot.append(svg("rect", {
      class: "band", x: x(p.t), y: top, width: barWidth, height: Math.max(1, bottom - top),
      "data-t": p.t, "data-min": p.min, "data-max": p.max, "data-avg": p.avg, "data-count": p.count,
    }));
    const cx = (x(p.t) + barWidth / 2).toFixed(1), cy = y(p.avg).toFixed(1);
    line += (previous !== null && p.t - previous === 60000 ? "L" : "M") + cx + " " + cy + " ";
    previous = p.t;
  }
  if (points.length === 1) {
    const cx = x(points[0].t), cy = y(points[0].avg).toFixed(1);
    line = "M" + cx.toFixed(1) + " " + cy + " L" + (cx + barWidth).toFixed(1) + " " + cy;
  }
  plot.append(svg("path", { class: "avg", d: line.trim() }));
  if (points.length === 0) {
    const empty = svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" });
    empty.textContent = "no data in the last " + minutes + " minutes";
    plot.append(empty);
  }
  figure.append(plot);
  return figure;
}

function averagesTable(clientId, averages) {
  const table = el("table", { class: "averages", "data-client": clientId, "data-now-ms": averages.now_ms },
    el("thead", {}, el("tr", {}, el("th", {}, "sensor"), el("th", {}, "latest"), el("th", {}, "at"),
      ...averages.windows_min.map((m) => el("th", { title: "mean (readings)" }, m + " min avg")))));
  const body = el("tbody", {});
  for (const s of averages.sensors) {
    body.append(el("tr", { "data-sensor": s.sensor, "data-last": s.last, "data-last-ms": s.last_ms },
      el("td", {}, s.sensor),
      el("td", {}, value(s.last)),
      el("td", { title: stamp(s.last_ms) }, age(averages.now_ms - s.last_ms)),
      ...s.windows.map((w) => el("td", { "data-window": w.minutes, "data-count": w.count, "data-avg": w.avg },
        w.avg === null ? "–" : value(w.avg), el("span", { class: "muted" }, " (" + int(w.count) + ")")))));
  }
  table.append(body);
  return table;
}

function renderClient(client, seriesAnswer, averages) {
  const block = el("div", { class: "client", "data-client": client.client_id });
  block.append(el("h3", {}, client.client_id + " ",
    el("span", { class: "muted" }, "last " + seriesAnswer.minutes + " minutes: min / mean / max per minute")));
  const charts = el("div", { class: "charts" });
  const bySensor = new Map(seriesAnswer.series.map((s) => [s.sensor, s]));
  const names = [...new Set([...client.sensors, ...bySensor.keys()])].sort();
  for (const name of names) {
    charts.append(chart(client.client_id, bySensor.get(name) || { sensor: name, points: [] },
      seriesAnswer.from_ms, seriesAnswer.minutes));
  }
  block.append(charts, el("h3", {}, "Rolling averages ", el("span", { class: "muted" }, "of stored readings, by reading time")),
    averagesTable(client.client_id, averages));
  return block;
}

// ---- dead letters --------------------------------------------------------------

function renderErrors(errors) {
  const section = document.getElementById("errors");
  setAttrs(section, { "data-total": errors.total });
  document.getElementById("errors-total").textContent = int(errors.total) + " stored";
  document.getElementById("errors-reasons").replaceChildren(
    ...Object.entries(errors.by_reason).map(([reason, n]) => el("span", { "data-reason": reason, "data-count": n }, reason + ": " + n)));
  document.getElementById("errors-table").tBodies[0].replaceChildren(...errors.recent.map((e) =>
    el("tr", {}, el("td", {}, stamp(e.received_at_ms)), el("td", {}, e.client_id), el("td", {}, e.reason),
      el("td", { class: "text" }, e.error), el("td", {}, int(e.payload_bytes)), el("td", { class: "text" }, e.payload_head))));
}

// ---- refresh loop ----------------------------------------------------------------

async function refresh() {
  if (page.busy) return;
  page.busy = true;
  try {
    const [health, fleet, errors] = await Promise.all([api("health"), api("clients"), api("errors", { limit: 10 })]);
    renderHealth(health);
    renderFleet(fleet);
    renderErrors(errors);
    let shown = fleet.clients;
    if (shown.length > MAX_CHART_CLIENTS) {
      shown = shown.filter((c) => c.client_id === page.selected);
      if (shown.length === 0) shown = fleet.clients.slice(0, 1);
    }
    const blocks = await Promise.all(shown.map(async (c) => {
      const [seriesAnswer, averages] = await Promise.all([
        api("series", { client_id: c.client_id, minutes: 60 }),
        api("averages", { client_id: c.client_id }),
      ]);
      return renderClient(c, seriesAnswer, averages);
    }));
    document.getElementById("clients").replaceChildren(
      el("h2", {}, "Clients ", el("span", { class: "muted" }, shown.length + " of " + fleet.clients.length + " shown")), ...blocks);
    page.refreshes += 1;
    setAttrs(document.body, { "data-state": "ready", "data-refreshes": page.refreshes, "data-updated-ms": fleet.now_ms });
    document.getElementById("status").textContent = "updated " + stamp(fleet.now_ms);
  } catch (error) {
    setAttrs(document.body, { "data-state": "error", "data-error": String(error.message || error) });
    document.getElementById("status").textContent = "error: " + (error.message || error);
  } finally {
    page.busy = false;
  }
}

function schedule() {
  clearTimeout(page.timer);
  const seconds = Number(document.getElementById("refresh").value);
  if (seconds > 0) {
    page.timer = setTimeout(async () => {
      await refresh();
      schedule();
    }, seconds * 1000);
  }
}

function refreshSoon() {
  refresh().then(schedule);
}

document.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.search);
  if (params.has("client")) page.selected = params.get("client");
  const select = document.getElementById("refresh");
  if (params.has("refresh")) {
    const wanted = params.get("refresh");
    if ([...select.options].some((o) => o.value === wanted)) select.value = wanted;
  }
  select.addEventListener("change", schedule);
  refreshSoon();
});
