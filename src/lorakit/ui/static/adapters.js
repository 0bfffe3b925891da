// The Adapters view: the adapter list; one picked adapter's inspection report as bar charts (||ΔW||
// and effective rank per module, in layer order); two picked: both reports and their subspace
// similarity φ(i, j) (the mean over modules as a heat map, φ(k, k) per module as a table).
"use strict";
(() => {
  const state = {adapters: [], picked: [], reports: {}, loaded: false};
  const $ = (id) => document.getElementById(id);

  async function list() {
    try {
      state.adapters = (await LK.get("/ui/api/adapters")).adapters;
      $("adapters-note").textContent = state.adapters.length + " adapter" + (state.adapters.length === 1 ? "" : "s");
    } catch (e) {
      $("adapters-note").textContent = e.message;
    }
    table();
  }

  function table() {
    const body = $("adapter-table").tBodies[0];
    body.textContent = "";
    for (const a of state.adapters) {
      const i = state.picked.indexOf(a.id);
      const box = LK.el("input", {type: "checkbox"});
      box.checked = i >= 0;
      const targets = compact(a.target_modules);
      const row = LK.el("tr", {class: i >= 0 ? "picked-" + i : "", "data-adapter": a.id},
        LK.el("td", {}, box), LK.el("td", {}, a.id), LK.el("td", {class: "num"}, LK.fmt(a.r)),
        LK.el("td", {class: "num"}, LK.fmt(a.lora_alpha)), LK.el("td", {}, a.problem || targets),
        LK.el("td", {}, a.base));
      row.addEventListener("click", () => pick(a.id));
      body.append(row);
    }
  }

  // Layer order: "layers.2" before "layers.10" (the report lists modules as plain sorted strings).
  const natural = (a, b) => a.localeCompare(b, "en", {numeric: true});

  // Target lists of full module paths (a trained run's) shortened to their distinct last parts.
  function compact(targets) {
    if (!Array.isArray(targets)) return targets;
    const last = [...new Set(targets.map((t) => t.split(".").pop()))];
    return last.join(", ") + (last.length < targets.length ? ` (${targets.length} modules)` : "");
  }

  async function pick(id) {
    const at = state.picked.indexOf(id);
    if (at >= 0) state.picked.splice(at, 1);
    else { state.picked.push(id); if (state.picked.length > 2) state.picked.shift(); }
    table();
    try {
      for (const p of state.picked) {
        if (!state.reports[p]) state.reports[p] = await LK.get("/ui/api/adapter?id=" + encodeURIComponent(p));
      }
      LK.problem("");
    } catch (e) {
      LK.problem(e.message);
      return;
    }
    report();
    compare();
  }

  function report() {
    $("adapter-report").hidden = !state.picked.length;
    if (!state.picked.length) return;
    const reps = state.picked.map((id) => state.reports[id]);
    const modules = [...new Set(reps.flatMap((r) => r.modules.map((m) => m.module)))].sort(natural);
    const index = new Map(modules.map((m, i) => [m, i]));
    $("adapter-summary").textContent = reps.map((r) =>
      `${r.id}: r=${r.config.r}, alpha=${r.config.lora_alpha}, ${r.modules.length} modules, ` +
      `${r.parameters.toLocaleString("en")} parameters, ${(r.bytes / 1048576).toFixed(2)} MiB`).join("  ·  ");
    for (const [key, name, title] of [["delta_norm", "norm", "||ΔW|| per module (Frobenius)"],
                                       ["effective_rank", "rank", "effective rank per module"]]) {
      bars(name, $("chart-" + name), title, modules, reps.map((r, i) => ({
        label: r.id, color: LK.colors[i],
        values: r.modules.map((m) => [index.get(m.module), m[key]])})));
    }
  }

  // Bars over module indices (two adapters: side by side); the legend names the module under the cursor.
  function bars(name, el, title, modules, series) {
    if (LK.charts[name]) { LK.charts[name].destroy(); delete LK.charts[name]; }
    el.textContent = "";
    const data = LK.align(series.map((s) => s.values));
    const two = series.length > 1;
    LK.charts[name] = new uPlot({
      title, width: Math.max(300, el.clientWidth - 12), height: 260,
      scales: {x: {time: false, range: (u, lo, hi) => [lo - 0.6, hi + 0.6]}, y: {range: (u, lo, hi) => [0, hi * 1.08 || 1]}},
      axes: [{label: "module (layer order)", size: 40}, {size: 60, values: (u, v) => v.map((x) => LK.fmt(x, 2))}],
      series: [{label: "module", value: (u, v) => v === null || v === undefined ? "" : modules[v] || ""},
        ...series.map((s, i) => ({label: s.label, stroke: s.color, fill: s.color + "cc", width: 0,
          paths: uPlot.paths.bars({size: [two ? 0.4 : 0.8, 40], align: two ? (i ? 1 : -1) : 0}),
          points: {show: false}, value: (u, v) => LK.fmt(v)}))],
    }, data, el);
    LK.charts[name].lorakitModules = modules;
  }

  async function compare() {
    const box = $("adapter-compare");
    box.hidden = state.picked.length !== 2;
    if (state.picked.length !== 2) return;
    const [a, b] = state.picked;
    $("compare-title").textContent = `subspace similarity φ(i, j) of ${a} (i) and ${b} (j)`;
    let sim;
    try {
      sim = await LK.get(`/ui/api/similarity?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    } catch (e) {
      $("compare-title").textContent = "subspace similarity: " + e.message;
      $("compare-table").textContent = "";
      heat(null);
      return;
    }
    state.similarity = sim;
    heat(sim.mean);
    const t = $("compare-table");
    t.textContent = "";
    const r = Math.min(...sim.modules.map((m) => Math.min(m.r1, m.r2)));
    const ks = [1, 2, 4, 8, 16, 32, 64].filter((k) => k <= r);
    t.append(LK.el("tr", {}, LK.el("th", {}, "module"), ...ks.map((k) => LK.el("th", {}, `φ(${k},${k})`))));
    for (const m of [...sim.modules].sort((x, y) => natural(x.module, y.module))) {
      t.append(LK.el("tr", {}, LK.el("td", {}, m.module), ...ks.map((k) => LK.el("td", {class: "num"}, m.phi[k - 1][k - 1].toFixed(3)))));
    }
    if (sim.mean) {
      t.append(LK.el("tr", {}, LK.el("th", {}, `mean over ${sim.modules.length} modules`),
        ...ks.map((k) => LK.el("th", {class: "num"}, sim.mean[k - 1][k - 1].toFixed(3)))));
    }
  }

  // viridis at a few stops, linearly interpolated; v in [0, 1]
  const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const color = (v) => {
    const x = Math.min(1, Math.max(0, v)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
    return "rgb(" + STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c))).join(",") + ")";
  };

  function heat(grid) {
    const c = $("heatmap"), g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    if (!grid) return;
    const left = 40, bottom = 40, right = 50, w = c.width - left - right, h = c.height - bottom - 10;
    const rows = grid.length, cols = grid[0].length;
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {  // i up (origin lower left), j across
      g.fillStyle = color(grid[i][j]);
      g.fillRect(left + j * w / cols, 10 + h - (i + 1) * h / rows, Math.ceil(w / cols), Math.ceil(h / rows));
    }
    g.fillStyle = "#1d232a"; g.font = "12px system-ui";
    g.fillText("j →", left + w / 2 - 10, c.height - 8);
    g.save(); g.translate(14, 10 + h / 2 + 10); g.rotate(-Math.PI / 2); g.fillText("i →", 0, 0); g.restore();
    g.fillText("1", left - 12, 10 + h - 2); g.fillText(String(rows), left - 22, 20);
    g.fillText("1", left + 2, 10 + h + 14); g.fillText(String(cols), left + w - 14, 10 + h + 14);
    for (let k = 0; k <= 20; k++) {  // the colour bar, 0 at the bottom
      g.fillStyle = color(k / 20);
      g.fillRect(c.width - right + 14, 10 + h - (k + 1) * h / 21, 14, Math.ceil(h / 21));
    }
    g.fillStyle = "#1d232a"; g.fillText("1", c.width - right + 32, 20); g.fillText("0", c.width - right + 32, 10 + h);
  }

  LK.views.adapters = {
    open: async () => {
      if (!LK.info.adapters && !LK.info.runs) {
        $("adapters-note").textContent = "started without --adapters DIR or --runs DIR: no adapters to show";
        return;
      }
      if (!state.loaded) { state.loaded = true; await list(); }
    },
    state,
    pick,
  };
})();
