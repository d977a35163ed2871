// psc-nas dashboard: draws one run's payload (built by psc_nas/dashboard.py) with plotly.js.
// A snapshot carries the payload in <script id="run-data">; the live page polls api/run.json.
"use strict";
(() => {
  const COSTS = [["params", "parameters"], ["macs", "MACs"], ["latency_ms", "latency (ms)"]];
  const FINISHED = new Set(["COMPLETE", "FAIL", "PRUNED"]);
  // Every finished trial falls in exactly one category, so each plot shows it exactly once.
  const CATEGORIES = {
    front: { name: "Pareto front", color: "#1f4e9c", symbol: "circle", size: 10 },
    feasible: { name: "feasible", color: "#8fb8de", symbol: "circle", size: 7 },
    preset: { name: "hand-designed preset", color: "#f28e2b", symbol: "star", size: 15 },
    infeasible: { name: "over budget", color: "#8c8c8c", symbol: "circle-open", size: 8 },
    failed: { name: "failed", color: "#d62728", symbol: "x", size: 9 },
  };
  // CAKES sub-kernels keep the paper's grouping: 1D blues, 2D greens, the full cube red.
  const KIND_COLORS = {
    "1x1x3": "#c6dbef", "1x3x1": "#6baed6", "3x1x1": "#2171b5",
    "1x3x3": "#c7e9c0", "3x1x3": "#74c476", "3x3x1": "#238b45", "3x3x3": "#d62728",
  };
  const OTHER_COLORS = ["#9467bd", "#c5b0d5", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff9896",
    "#7f7f7f", "#dbdb8d", "#9edae5", "#f7b6d2", "#c49c94", "#393b79", "#637939"];
  const PLOT_CONFIG = { displaylogo: false, responsive: true };

  let data = null;
  let byNumber = new Map();
  let kindColor = new Map();
  let selected = null;
  let sort = { key: "number", ascending: true };

  const $ = (id) => document.getElementById(id);

  function count(value) {
    if (value == null) return "–";
    for (const [suffix, scale] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (Math.abs(value) >= scale) return `${+(value / scale).toPrecision(3)}${suffix}`;
    }
    return String(value);
  }
  const number = (value, digits = 4) => (value == null ? "–" : (+value).toFixed(digits));

  function category(trial, front) {
    if (trial.over_budget) return "infeasible";  // priced over budget: PRUNED, never evaluated
    if (trial.state !== "COMPLETE") return "failed";
    if (trial.preset) return "preset";
    return front.has(trial.number) ? "front" : "feasible";
  }

  function hoverText(trial) {
    const lines = [
      `<b>trial ${trial.number}</b> (${trial.state.toLowerCase()}${category(trial, new Set()) === "infeasible" ? ", over budget" : ""})`,
      `${data.run.quality} (search): ${number(trial.quality)}`,
      `params: ${count(trial.params)}   MACs: ${count(trial.macs)}`,
    ];
    if (trial.latency_ms != null) lines.push(`latency: ${number(trial.latency_ms, 2)} ms`);
    if (trial.fidelity_words != null) lines.push(`search fidelity: ${trial.fidelity_words}`);
    if (trial.retrained != null) lines.push(`retrained ${data.run.quality}: ${number(trial.retrained)} (${trial.retrained_fidelity})`);
    if (trial.preset) lines.push(`preset: ${trial.preset}`);
    if (trial.fail_reason) lines.push(`failed: ${trial.fail_reason}`);
    if (trial.summary) lines.push(trial.summary);
    return lines.join("<br>");
  }

  // Failed trials have no accuracy: they sit on a strip just below the worst finished one.
  function qualityFloor() {
    const values = data.trials.map((t) => t.quality).filter((q) => q != null);
    if (!values.length) return 0;
    const low = Math.min(...values);
    const high = Math.max(...values);
    return low - 0.05 * (high - low || 1);
  }

  function categoryTraces(trials, front, coords, base) {
    return Object.entries(CATEGORIES).map(([key, style]) => {
      const members = trials.filter((t) => category(t, front) === key);
      const trace = {
        ...base,
        name: style.name,
        mode: key === "preset" ? "markers+text" : "markers",
        customdata: members.map((t) => t.number),
        hovertext: members.map(hoverText),
        hoverinfo: "text",
        text: members.map((t) => (key === "preset" ? t.preset : "")),
        textposition: "top center",
        marker: { color: style.color, symbol: style.symbol, size: style.size, line: { width: 1, color: "#333" } },
      };
      for (const [axis, of] of Object.entries(coords)) trace[axis] = members.map(of);
      return trace;
    });
  }

  function bindClick(element) {
    if (element.dataset.bound) return;
    element.dataset.bound = "1";
    element.on("plotly_click", (event) => {
      const point = event.points.find((p) => p.customdata != null);
      if (point) showTrial(point.customdata);
    });
  }

  function budgetShape(value, label) {
    return {
      shape: { type: "line", x0: value, x1: value, yref: "paper", y0: 0, y1: 1, line: { dash: "dash", color: "#d62728" } },
      annotation: { x: Math.log10(value), yref: "paper", y: 1, text: `budget ${label}`, showarrow: false,
        xanchor: "left", font: { color: "#d62728" } },
    };
  }

  function drawFront(cost, title) {
    const element = $(`front-${cost}`);
    const trials = data.trials.filter((t) => FINISHED.has(t.state) && t[cost] != null);
    element.hidden = cost === "latency_ms" && !trials.length;
    if (element.hidden) return;
    const front = new Set(data.fronts[cost]);
    const floor = qualityFloor();
    const traces = categoryTraces(trials, front, { x: (t) => t[cost], y: (t) => t.quality ?? floor }, { type: "scatter" });
    const line = data.fronts[cost].map((n) => byNumber.get(n)).sort((a, b) => a[cost] - b[cost]);
    traces.unshift({ type: "scatter", mode: "lines", name: "front", x: line.map((t) => t[cost]),
      y: line.map((t) => t.quality), line: { shape: "hv", color: CATEGORIES.front.color, width: 1.5 },
      hoverinfo: "skip", showlegend: false });
    // Front members retrained after the search: their retrained score, beside the search's
    const retrained = trials.filter((t) => t.retrained != null);
    if (retrained.length) {
      traces.push({ type: "scatter", mode: "markers", name: `retrained (${retrained[0].retrained_fidelity})`,
        x: retrained.map((t) => t[cost]), y: retrained.map((t) => t.retrained), customdata: retrained.map((t) => t.number),
        hovertext: retrained.map(hoverText), hoverinfo: "text",
        marker: { symbol: "diamond", size: 11, color: "#9467bd", line: { color: "#000", width: 1 } } });
    }
    const shapes = [];
    const annotations = [];
    const budget = { params: data.run.budget_params, macs: data.run.budget_macs }[cost];
    if (budget) {
      const b = budgetShape(budget, count(budget));
      shapes.push(b.shape);
      annotations.push(b.annotation);
    }
    // data.knee is best.yaml's trial: the retrained knee once the front was retrained, else the search's knee
    const bestLabel = data.search_knee != null && data.knee !== data.search_knee ? "best.yaml (retrained knee)" : "knee";
    const marked = new Map([[data.knee, bestLabel]]);
    if (data.search_knee != null && data.search_knee !== data.knee) marked.set(data.search_knee, "knee by search score");
    if (selected != null) marked.set(selected, marked.has(selected) ? `${marked.get(selected)} · trial ${selected}` : `trial ${selected}`);
    for (const [n, text] of marked) {
      const trial = byNumber.get(n);
      const y = n === data.knee && trial && trial.retrained != null ? trial.retrained : trial && trial.quality;
      if (trial && trial[cost] != null && y != null) {
        // Annotations on a log axis take log10 coordinates (shapes take data values).
        annotations.push({ x: Math.log10(trial[cost]), y, text, arrowhead: 2, ax: 30, ay: -30 });
      }
    }
    Plotly.react(element, traces, {
      title: { text: `${data.run.quality} vs ${title}` },
      xaxis: { title: { text: title }, type: "log", exponentformat: "SI" },
      yaxis: { title: { text: data.run.quality } },
      shapes, annotations, uirevision: "keep", hovermode: "closest",
      legend: { orientation: "h", y: -0.2 }, margin: { t: 40, r: 20 },
    }, PLOT_CONFIG);
    bindClick(element);
  }

  function draw3d() {
    const trials = data.trials.filter((t) => FINISHED.has(t.state) && t.params != null && t.macs != null);
    const floor = qualityFloor();
    const traces = categoryTraces(trials, new Set(data.fronts.params),
      { x: (t) => t.params, y: (t) => t.macs, z: (t) => t.quality ?? floor }, { type: "scatter3d" });
    for (const trace of traces) trace.marker.size = Math.max(3, trace.marker.size / 2);
    Plotly.react($("view3d"), traces, {
      title: { text: `3D view: params × MACs × ${data.run.quality}` },
      scene: { xaxis: { title: { text: "params" }, type: "log", exponentformat: "SI" },
        yaxis: { title: { text: "MACs" }, type: "log", exponentformat: "SI" },
        zaxis: { title: { text: data.run.quality } } },
      uirevision: "keep", showlegend: false, margin: { t: 40, l: 0, r: 0, b: 0 },
    }, PLOT_CONFIG);
    bindClick($("view3d"));
  }

  function drawHypervolume() {
    const history = data.hypervolume;
    Plotly.react($("hypervolume"), [{
      type: "scatter", mode: "lines+markers", x: history.map((_, i) => i + 1), y: history.map((h) => h.hypervolume),
      customdata: history.map((h) => h.trial),
      hovertemplate: "after trial %{customdata} (%{x} finished)<br>hypervolume %{y:.4f}<extra></extra>",
    }], {
      title: { text: "Hypervolume over time (normalized objectives)" },
      xaxis: { title: { text: "finished feasible trials" } }, yaxis: { title: { text: "hypervolume" }, rangemode: "tozero" },
      uirevision: "keep", margin: { t: 40, r: 20 },
    }, PLOT_CONFIG);
  }

  function drawParcoords() {
    const trials = data.trials.filter((t) => t.state === "COMPLETE" && t.arch && t.quality != null);
    if (!trials.length) return Plotly.purge($("parcoords"));
    const blocks = trials[0].arch;
    const dimensions = blocks.map((block, i) => {
      const labels = [...new Set(trials.map((t) => t.arch[i].op))].sort();
      return { label: block.slot, values: trials.map((t) => labels.indexOf(t.arch[i].op)),
        tickvals: labels.map((_, k) => k), ticktext: labels };
    });
    dimensions.push({ label: "params", values: trials.map((t) => t.params) },
      { label: "MACs", values: trials.map((t) => t.macs) },
      { label: data.run.quality, values: trials.map((t) => t.quality) });
    Plotly.react($("parcoords"), [{
      type: "parcoords", dimensions,
      line: { color: trials.map((t) => t.quality), colorscale: "Viridis", showscale: true },
    }], { title: { text: "Choices per block (parallel coordinates, color = " + data.run.quality + ")" },
      margin: { t: 80, l: 120, r: 60 }, uirevision: "keep" }, PLOT_CONFIG);
  }

  const TABLE_COLUMNS = [
    ["number", "#", String], ["state", "state", String], ["feasible", "feasible", (v) => (v ? "yes" : "no")],
    ["quality", null, (v) => number(v)], ["fidelity_words", "search fidelity", (v) => v || "–"],
    ["retrained", "retrained", (v) => number(v)], ["retrained_fidelity", "retrained how", (v) => v || "–"],
    ["params", "params", count], ["macs", "MACs", count], ["latency_ms", "latency ms", (v) => number(v, 2)],
    ["train_s", "train s", (v) => (v ? number(v, 1) : "–")],
    ["preset", "preset", (v) => v || ""], ["summary", "architecture", (v) => v || ""],
  ];

  function drawTable() {
    const head = $("trial-table").tHead;
    head.replaceChildren(document.createElement("tr"));
    for (const [key, title] of TABLE_COLUMNS) {
      const th = document.createElement("th");
      th.textContent = key === "quality" ? `${data.run.quality} (search)`
        : key === "retrained" ? `${data.run.quality} (retrained)` : title;
      th.dataset.key = key;
      if (sort.key === key) th.className = sort.ascending ? "asc" : "desc";
      th.onclick = () => {
        sort = { key, ascending: sort.key === key ? !sort.ascending : true };
        drawTable();
      };
      head.rows[0].appendChild(th);
    }
    const rows = [...data.trials].sort((a, b) => {
      const x = a[sort.key];
      const y = b[sort.key];
      const order = x == null ? 1 : y == null ? -1 : x < y ? -1 : x > y ? 1 : 0;
      return sort.ascending || x == null || y == null ? order : -order;
    });
    const body = $("trial-table").tBodies[0];
    body.replaceChildren(...rows.map((trial) => {
      const tr = document.createElement("tr");
      tr.dataset.number = trial.number;
      if (trial.number === selected) tr.className = "selected";
      for (const [key, , format] of TABLE_COLUMNS) {
        const td = document.createElement("td");
        td.textContent = format(trial[key]);
        tr.appendChild(td);
      }
      tr.onclick = () => showTrial(trial.number);
      return tr;
    }));
  }

  function drawArchitecture(trial) {
    if (!trial.arch) {
      Plotly.purge($("arch"));
      $("arch").textContent = `No architecture to draw: ${trial.arch_error}`;
      return;
    }
    $("arch").textContent = "";
    const slots = trial.arch.map((b) => b.slot);
    const kinds = [...kindColor.keys()].filter((k) => trial.arch.some((b) => b.segments.some(([kind]) => kind === k)));
    const traces = kinds.map((kind) => {
      const channels = trial.arch.map((b) => b.segments.filter(([k]) => k === kind).reduce((s, [, c]) => s + c, 0));
      return {
        type: "bar", name: kind, x: slots, y: channels.map((c, i) => c / trial.arch[i].channels),
        customdata: channels.map((c, i) => [c, trial.arch[i].op]),
        marker: { color: kindColor.get(kind), line: { width: 0.5, color: "#fff" } },
        hovertemplate: `%{x}: %{customdata[1]}<br>${kind}: %{customdata[0]} channels (%{y:.0%})<extra></extra>`,
      };
    });
    Plotly.react($("arch"), traces, {
      title: { text: "Architecture: sub-kernels per block (height = share of output channels)" },
      barmode: "stack", bargap: 0.1, xaxis: { tickangle: -45, automargin: true },
      yaxis: { title: { text: "channel share" }, tickformat: ".0%", range: [0, 1] },
      legend: { title: { text: "sub-kernel" } }, margin: { t: 40, r: 20 },
    }, PLOT_CONFIG);
  }

  function drawCurve(trial) {
    const curve = trial.curve || [];
    const keys = [...new Set(curve.flatMap((row) => Object.keys(row)))]
      .filter((k) => k !== "epoch" && k !== "epoch_s" && curve.some((row) => typeof row[k] === "number"));
    const epochs = curve.map((row, i) => row.epoch ?? i);
    const traces = keys.map((key) => ({
      type: "scatter", mode: "lines+markers", name: key, x: epochs, y: curve.map((row) => row[key]),
      yaxis: key.includes("loss") ? "y2" : "y",
    }));
    Plotly.react($("curve"), traces, {
      title: { text: curve.length ? "Learning curve" : "Learning curve (none recorded)" },
      xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: "metric" } },
      yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right" },
      legend: { orientation: "h", y: -0.25 }, margin: { t: 40, r: 50 },
    }, PLOT_CONFIG);
  }

  function showTrial(n) {
    const trial = byNumber.get(n);
    if (!trial) return;
    selected = n;
    $("arch-title").textContent = `Trial ${n}: ${trial.summary || "(no architecture)"}`;
    drawArchitecture(trial);
    drawCurve(trial);
    const figures = [["state", trial.state], [`${data.run.quality} (search)`, number(trial.quality)],
      ["search fidelity", trial.fidelity_words ?? "–"],
      [`${data.run.quality} (retrained)`, trial.retrained != null ? number(trial.retrained) : "not retrained"],
      ["retrained how", trial.retrained_fidelity ?? "–"], ["params", count(trial.params)],
      ["MACs", count(trial.macs)], ["latency ms", number(trial.latency_ms, 2)],
      ["preset", trial.preset || "–"], ["hash", trial.arch_hash || "–"], ["fail reason", trial.fail_reason || "–"],
      ...Object.entries(trial.metrics || {}).map(([k, v]) => [k, typeof v === "number" ? number(v) : String(v)])];
    $("trial-figures").replaceChildren(...figures.map(([k, v]) => {
      const tr = document.createElement("tr");
      for (const text of [k, v]) tr.appendChild(document.createElement("td")).textContent = text;
      return tr;
    }));
    $("trial-config").textContent = trial.config || "";
    $("trial-export").textContent = trial.export;
    COSTS.forEach(([cost, title]) => drawFront(cost, title));
    drawTable();
  }

  function assignKindColors() {
    const kinds = [...new Set(data.trials.flatMap((t) => (t.arch || []).flatMap((b) => b.segments.map(([k]) => k))))];
    const known = Object.keys(KIND_COLORS).filter((k) => kinds.includes(k));
    const others = kinds.filter((k) => !(k in KIND_COLORS)).sort();
    kindColor = new Map([...known.map((k) => [k, KIND_COLORS[k]]),
      ...others.map((k, i) => [k, OTHER_COLORS[i % OTHER_COLORS.length]])]);
  }

  function drawHeader(mode) {
    const run = data.run;
    $("run-title").textContent = `psc-nas · ${run.name}`;
    // The search prunes a trial only for its budget, before evaluating it.
    const states = Object.entries(run.states)
      .map(([s, n]) => `${n} ${s === "PRUNED" ? "over budget" : s.toLowerCase()}`).join(", ");
    const budgets = [run.budget_params && `params ≤ ${count(run.budget_params)}`, run.budget_macs && `MACs ≤ ${count(run.budget_macs)}`]
      .filter(Boolean).join(", ");
    $("run-facts").textContent = [run.task && `task ${run.task}`, run.space && `space ${run.space}`,
      budgets && `budget ${budgets}`, `trials: ${states || "none yet"}`].filter(Boolean).join(" · ");
    $("status").textContent = mode;
  }

  function render(payload, mode) {
    data = payload;
    byNumber = new Map(data.trials.map((t) => [t.number, t]));
    assignKindColors();
    drawHeader(mode);
    COSTS.forEach(([cost, title]) => drawFront(cost, title));
    draw3d();
    drawHypervolume();
    drawParcoords();
    drawTable();
    if (selected != null && byNumber.has(selected)) showTrial(selected);
  }

  async function poll() {
    try {
      const response = await fetch("api/run.json", { cache: "no-store" });
      const payload = await response.json();
      const mode = `live · updated ${new Date().toLocaleTimeString()} · refreshing every ${POLL_MS / 1000} s`;
      if (!data || payload.version !== data.version) render(payload, mode);
      else $("status").textContent = mode;
    } catch (error) {
      $("status").textContent = `cannot reach the dashboard server (${error.message}); showing the last data`;
    }
    setTimeout(poll, POLL_MS);
  }

  const embedded = $("run-data");
  if (embedded) render(JSON.parse(embedded.textContent), "static snapshot");
  else poll();
})();
