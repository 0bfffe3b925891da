// The Runs view: the run list, one or two picked runs' curves (loss / eval loss, learning rate,
// tokens per second, gradient norm), final metrics and resolved configs side by side. Picked runs
// are followed live: their metrics.jsonl is polled from the last byte offset every POLL_MS.
"use strict";
(() => {
  const POLL_MS = 2000, LIST_MS = 5000;
  const state = {runs: [], picked: [], data: {}, timer: null, listed: 0, busy: false};
  const $ = (id) => document.getElementById(id);

  async function list() {
    try {
      state.runs = (await LK.get("/ui/api/runs")).runs;
      $("runs-note").textContent = state.runs.length + " run" + (state.runs.length === 1 ? "" : "s");
    } catch (e) {
      $("runs-note").textContent = e.message;
      state.runs = [];
    }
    state.listed = Date.now();
    table();
  }

  function table() {
    const body = $("run-table").tBodies[0];
    body.textContent = "";
    for (const r of state.runs) {
      const i = state.picked.indexOf(r.id);
      const box = LK.el("input", {type: "checkbox", "data-run": r.id});
      box.checked = i >= 0;
      const f = r.final || {};
      const row = LK.el("tr", {class: i >= 0 ? "picked-" + i : "", "data-run": r.id},
        LK.el("td", {}, box), LK.el("td", {}, r.id),
        LK.el("td", {class: "status-" + r.status}, r.status), LK.el("td", {class: "num"}, LK.fmt(f.steps)),
        LK.el("td", {class: "num"}, LK.fmt(f.loss)), LK.el("td", {class: "num"}, LK.fmt(f.eval_loss)),
        LK.el("td", {class: "num"}, LK.fmt(f.tokens_per_s, 1)), LK.el("td", {}, LK.ago(r.modified)));
      row.addEventListener("click", () => pick(r.id));
      body.append(row);
    }
  }

  function pick(id) {
    const at = state.picked.indexOf(id);
    if (at >= 0) state.picked.splice(at, 1);
    else { state.picked.push(id); if (state.picked.length > 2) state.picked.shift(); }
    table();
    for (const id of state.picked) if (!state.data[id]) state.data[id] = {rows: [], offset: 0, file: null, detail: null};
    refresh(true);
  }

  // Fetch what is new for each picked run (its detail once, then metrics from the last offset).
  async function refresh(force) {
    if (state.busy) return;
    state.busy = true;
    let changed = !!force;
    try {
      for (const id of state.picked) {
        const d = state.data[id];
        if (!d.detail) { d.detail = await LK.get("/ui/api/run?id=" + encodeURIComponent(id)); changed = true; }
        const summary = state.runs.find((r) => r.id === id);
        if (d.file && summary && summary.status === "finished" && d.done) continue;
        let m = await LK.get(`/ui/api/metrics?id=${encodeURIComponent(id)}&offset=${d.offset}`);
        if (d.file && m.file !== d.file) {  // the log was rewritten (a resumed run): start over
          d.rows = []; d.offset = 0;
          m = await LK.get(`/ui/api/metrics?id=${encodeURIComponent(id)}&offset=0`);
        }
        d.file = m.file; d.offset = m.offset; d.done = summary && summary.status === "finished" && m.offset >= m.size;
        if (m.rows.length) { d.rows.push(...m.rows); changed = true; }
      }
      LK.problem("");
    } catch (e) {
      LK.problem(e.message);
    } finally {
      state.busy = false;
    }
    if (changed) detail();
  }

  const series = (rows, key) => rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number")
    .map((r) => [r.step, r[key]]);

  function detail() {
    $("run-detail").hidden = state.picked.length === 0;
    if (!state.picked.length) return;
    const runs = state.picked.map((id, i) => ({id, i, color: LK.colors[i], ...state.data[id]}));
    const two = runs.length > 1;
    const name = (r, what) => (two ? r.id + " " : "") + what;
    LK.lineChart("loss", $("chart-loss"), "loss (nats / token)", "step", runs.flatMap((r) => [
      {label: name(r, "train loss"), color: r.color, points: series(r.rows, "loss")},
      {label: name(r, "eval loss"), color: r.color, dash: [6, 4], dots: true, points: series(r.rows, "eval_loss")}]));
    LK.lineChart("lr", $("chart-lr"), "learning rate", "step",
      runs.map((r) => ({label: name(r, "lr"), color: r.color, points: series(r.rows, "lr")})));
    LK.lineChart("tokens_per_s", $("chart-tps"), "tokens per second", "step",
      runs.map((r) => ({label: name(r, "tokens/s"), color: r.color, points: series(r.rows, "tokens_per_s")})));
    LK.lineChart("grad_norm", $("chart-grad"), "gradient norm (before clipping)", "step",
      runs.map((r) => ({label: name(r, "grad norm"), color: r.color, points: series(r.rows, "grad_norm")})));
    finals(runs);
    configs(runs);
  }

  function header(runs) {
    return LK.el("tr", {}, LK.el("th", {}, ""), ...runs.map((r) =>
      LK.el("th", {style: `border-bottom: 3px solid ${r.color}`}, r.id)));
  }

  function finals(runs) {
    const t = $("run-final");
    t.textContent = "";
    t.append(header(runs));
    const keys = [["steps", "steps"], ["loss", "last train loss"], ["eval_loss", "last eval loss"],
      ["best_eval_loss", "best eval loss"], ["eval_perplexity", "eval perplexity"], ["tokens", "tokens"],
      ["elapsed_s", "seconds"], ["tokens_per_s", "tokens / s (mean)"], ["lr", "last learning rate"]];
    const final = (r) => (state.runs.find((s) => s.id === r.id) || r.detail || {}).final || {};
    for (const [k, label] of keys) {
      const vals = runs.map((r) => final(r)[k]);
      if (vals.every((v) => v === undefined || v === null)) continue;
      t.append(LK.el("tr", {}, LK.el("th", {}, label), ...vals.map((v) => LK.el("td", {class: "num"}, LK.fmt(v)))));
    }
    const status = runs.map((r) => (state.runs.find((s) => s.id === r.id) || {}).status || "");
    t.append(LK.el("tr", {}, LK.el("th", {}, "status"), ...status.map((s) => LK.el("td", {class: "status-" + s}, s))));
  }

  function configs(runs) {
    const t = $("run-config");
    t.textContent = "";
    t.append(header(runs));
    const flats = runs.map((r) => (r.detail && r.detail.flat) || {});
    const keys = [...new Set(flats.flatMap((f) => Object.keys(f)))].sort();
    const only = $("diff-only").checked;
    const show = (v) => v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v);
    for (const k of keys) {
      const vals = flats.map((f) => show(f[k]));
      const differs = runs.length > 1 && new Set(vals).size > 1;
      if (only && !differs) continue;
      t.append(LK.el("tr", {}, LK.el("th", {}, k),
        ...vals.map((v) => LK.el("td", {class: differs ? "differs" : ""}, v))));
    }
    if (!keys.length) t.append(LK.el("tr", {}, LK.el("td", {}, "no run.yaml in this run")));
  }

  async function tick() {
    if ($("view-runs").hidden) return;
    if (Date.now() - state.listed > LIST_MS) await list();
    await refresh(false);
  }

  LK.views.runs = {
    open: async () => {
      if (!LK.info.runs) {
        $("runs-note").textContent = "started without --runs DIR: no runs to show";
        return;
      }
      await list();
      if (!state.timer) {
        state.timer = setInterval(tick, POLL_MS);
        $("diff-only").addEventListener("change", detail);
      }
    },
    state,
    pick,
  };
})();
