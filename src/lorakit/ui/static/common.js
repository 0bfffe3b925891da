// What the three views share: the LK namespace, the API key, JSON calls with the server's error shape,
// view switching by #hash, number formatting, and uPlot line charts over aligned step axes.
"use strict";
const LK = window.LK = {charts: {}, info: null, colors: ["#1f77b4", "#ff7f0e"]};

LK.key = () => sessionStorage.getItem("lorakit-key") || "";
LK.headers = (extra) => {
  const h = Object.assign({}, extra || {});
  if (LK.key()) h["Authorization"] = "Bearer " + LK.key();
  return h;
};

// GET a JSON endpoint; a 401 opens the key box; other errors throw with the server's message.
LK.get = async (path) => {
  const resp = await fetch(path, {headers: LK.headers()});
  return LK.read(resp);
};
LK.read = async (resp) => {
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) { document.getElementById("keybox").hidden = false; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : resp.status + " " + resp.statusText;
    const err = new Error(msg); err.status = resp.status; throw err;
  }
  return body;
};

LK.problem = (text) => {
  const el = document.getElementById("problem");
  el.textContent = text || ""; el.hidden = !text;
};

LK.el = (tag, attrs, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  return e;
};

LK.fmt = (v, digits) => {
  if (v === undefined || v === null || v === "") return "";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits === undefined ? 4 : digits);
};
LK.ago = (t) => {
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 172800) return Math.round(s / 3600) + " h ago";
  return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ");
};

// Several (x, y) lists on one x axis: the sorted union of their x, nulls where a list has no point.
LK.align = (lists) => {
  const xs = [...new Set(lists.flatMap((l) => l.map((p) => p[0])))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  const ys = lists.map((l) => { const y = new Array(xs.length).fill(null); for (const [x, v] of l) y[at.get(x)] = v; return y; });
  return [xs, ...ys];
};

// A line chart in `el` (replacing what was there); series: [{label, color, points: [[x, y]], dash, dots}].
LK.lineChart = (name, el, title, xlabel, series, opts) => {
  if (LK.charts[name]) { LK.charts[name].destroy(); delete LK.charts[name]; }
  el.textContent = "";
  const shown = series.filter((s) => s.points.length);
  if (!shown.length) { el.append(LK.el("div", {class: "empty"}, title + ": no points")); return null; }
  const data = LK.align(shown.map((s) => s.points));
  const width = Math.max(300, el.clientWidth - 12);
  const u = new uPlot({
    title, width, height: (opts && opts.height) || 240,
    scales: {x: {time: false}, y: (opts && opts.log) ? {distr: 3} : {}},
    axes: [{label: xlabel, size: 40}, {size: 60, values: (u, vals) => vals.map((v) => LK.fmt(v, 3))}],
    series: [{label: xlabel}, ...shown.map((s) => ({
      label: s.label, stroke: s.color, width: 1.5, spanGaps: true, dash: s.dash,
      points: {show: s.dots || data[0].length < 40, size: 5},
      value: (u, v) => LK.fmt(v)}))],
  }, data, el);
  u.lorakitSeries = shown.map((s) => s.label);
  LK.charts[name] = u;
  return u;
};

// Views: #runs, #adapters, #playground.
LK.views = {};
LK.show = () => {
  const name = (location.hash || "#runs").slice(1);
  const view = LK.views[name] ? name : "runs";
  for (const v of Object.keys(LK.views)) document.getElementById("view-" + v).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  LK.views[view].open();
};

LK.start = async () => {
  try {
    LK.info = await LK.get("/ui/api/info");
  } catch (e) {
    if (e.status !== 401) LK.problem(e.message);
    return;
  }
  if (LK.started) return LK.show();
  LK.started = true;
  document.getElementById("served").textContent = LK.info.model ? "model: " + LK.info.model : "no model (runs and adapters only)";
  window.addEventListener("hashchange", LK.show);
  LK.show();
};
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("key-save").addEventListener("click", () => {
    sessionStorage.setItem("lorakit-key", document.getElementById("key").value);
    document.getElementById("keybox").hidden = true; LK.problem(""); LK.start();
  });
  LK.start();
});
