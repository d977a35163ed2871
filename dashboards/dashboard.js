// psc-nas dashboard: draws one run's payload (built by psc_nas/dashboard.py) with plotly.js.
// A snapshot carries the payload in <script id="run-data">; the live page polls api/run.json.
"use strict";
(() => {
  const COSTS = [["params", "parameters"], ["macs", "MACs"], ["latency_ms", "latency (ms)"]];
  const FINISHED = new Set(["COMPLETE", "FAIL", "PRUNED"]);
  // Every finished trial falls in exactly one category, so each plot shows it exactly once. Color says
  // the category; the marker symbol says at which fidelity the score was measured (trials without a
  // score, over budget or failed, keep a symbol of their own).
  const CATEGORIES = {
    front: { name: "Pareto front", color: "#1f4e9c", size: 10 },
    feasible: { name: "feasible", color: "#8fb8de", size: 8 },
    preset: { name: "hand-designed preset", color: "#f28e2b", size: 12 },
    infeasible: { name: "over budget (not trained)", color: "#8c8c8c", symbol: "circle-open", size: 8 },
    failed: { name: "failed", color: "#d62728", symbol: "x", size: 9 },
  };
  // Search fidelities, highest first; these symbols exist in 2D and 3D plots alike.
  const SEARCH_SYMBOLS = ["circle", "square", "cross", "square-open", "diamond-open"];
  const GLYPHS = { circle: "●", square: "■", cross: "✚", "square-open": "□", "diamond-open": "◇", diamond: "◆" };
  const RETRAINED = { symbol: "diamond", color: "#9467bd", size: 11 };
  const HIGHLIGHT = { symbol: "circle-open", color: "#f5b700", size: 26, line: { width: 3, color: "#f5b700" } };
  const PLOT_CONFIG = {
    displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d", "toggleSpikelines", "hoverClosestCartesian",
      "hoverCompareCartesian", "hoverClosest3d", "resetCameraLastSave3d", "tableRotation"],
  };
  // Titles start at the left edge, below the strip where the toolbar appears on hover (top right), so
  // the toolbar covers none of them at any width.
  const title = (text) => ({ text, x: 0.01, xref: "container", xanchor: "left", y: 1, yref: "container",
    yanchor: "top", pad: { t: 30 }, font: { size: 14 } });
  const TOP = 62;  // top margin: toolbar strip + title
  // CAKES sub-kernels keep the paper's grouping: 1D blues, 2D greens, the full cube red.
  const KIND_COLORS = {
    "1x1x3": "#c6dbef", "1x3x1": "#6baed6", "3x1x1": "#2171b5",
    "1x3x3": "#c7e9c0", "3x1x3": "#74c476", "3x3x1": "#238b45", "3x3x3": "#d62728",
  };
  const CURVE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const OTHER_COLORS = ["#9467bd", "#c5b0d5", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff9896",
    "#7f7f7f", "#dbdb8d", "#9edae5", "#f7b6d2", "#c49c94", "#393b79", "#637939"];

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

  const searchSymbol = (i) => SEARCH_SYMBOLS[Math.min(i, SEARCH_SYMBOLS.length - 1)];

  // The marker symbol of a trial's search score: one per fidelity the search scored at.
  function fidelitySymbol(trial) {
    const i = data.run.fidelities.findIndex((f) => f.words === trial.fidelity_words);
    return searchSymbol(i < 0 ? 0 : i);
  }

  function symbolOf(trial, key) {
    return CATEGORIES[key].symbol || fidelitySymbol(trial);
  }

  const inputSize = () => (data.run.input_shape ? `input ${data.run.input_shape.join("×")}` : "the task's input size");

  // What the score axis shows, in words: the metric on validation data, after which training.
  function scoreTitle() {
    const q = `validation ${data.run.quality}`;
    const searched = data.run.fidelities;
    const retrained = data.run.retrained_fidelities;
    if (searched.length === 1 && !retrained.length) return `${q} after ${searched[0].words}`;
    const lines = searched.map((f, i) => `${GLYPHS[searchSymbol(i)]} search: after ${f.words}`);
    for (const words of retrained) lines.push(`${GLYPHS[RETRAINED.symbol]} ${words}`);
    return [q, ...lines.map((line) => `<span style="font-size:11px">${line}</span>`)].join("<br>");
  }

  function costTitle(cost) {
    if (cost === "params") return "parameters (exact count)";
    if (cost === "macs") return `MACs of one forward pass at ${inputSize()}`;
    return "latency of one sample (ms, median)";
  }

  function hoverText(trial) {
    const searched = trial.fidelity_words ? `after ${trial.fidelity_words}` : "search";
    const lines = [
      `<b>trial ${trial.number}</b> (${trial.state.toLowerCase()}${category(trial, new Set()) === "infeasible" ? ", over budget" : ""})`,
      `${data.run.quality} (search): ${number(trial.quality)}${trial.quality != null ? ` ${searched}` : ""}`,
      `params: ${count(trial.params)}   MACs: ${count(trial.macs)} at ${inputSize()}`,
    ];
    if (trial.latency_ms != null) lines.push(`latency: ${number(trial.latency_ms, 2)} ms`);
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
        meta: "trials",  // every finished trial, once (the tests count these points)
        showlegend: false,  // the legend keys below say what colors and symbols mean
        mode: key === "preset" ? "markers+text" : "markers",
        customdata: members.map((t) => t.number),
        hovertext: members.map(hoverText),
        hoverinfo: "text",
        text: members.map((t) => (key === "preset" ? t.preset : "")),
        textposition: "top center",
        marker: { color: style.color, symbol: members.map((t) => symbolOf(t, key)), size: style.size,
          line: { width: 1, color: "#333" } },
      };
      for (const [axis, of] of Object.entries(coords)) trace[axis] = members.map(of);
      return trace;
    });
  }

  // Legend-only traces: one per category shown (its color) and one per fidelity shown (its symbol).
  function legendKeys(trials, front, base, retrained) {
    const keys = [];
    const empty = base.type === "scatter3d" ? { x: [null], y: [null], z: [null] } : { x: [null], y: [null] };
    const shown = new Set(trials.map((t) => category(t, front)));
    for (const [key, style] of Object.entries(CATEGORIES)) {
      if (!shown.has(key)) continue;
      keys.push({ ...base, ...empty, mode: "markers", name: style.name, legendgroup: "kind",
        legendgrouptitle: { text: "trial" }, hoverinfo: "skip",
        marker: { color: style.color, symbol: style.symbol || "circle", size: 9, line: { width: 1, color: "#333" } } });
    }
    const scored = new Set(trials.filter((t) => t.quality != null).map(fidelitySymbol));
    data.run.fidelities.forEach((f, i) => {
      const symbol = searchSymbol(i);
      if (!scored.has(symbol)) return;
      keys.push({ ...base, ...empty, mode: "markers", name: `search: after ${f.words}`, legendgroup: "fidelity",
        legendgrouptitle: { text: `validation ${data.run.quality}` }, hoverinfo: "skip",
        marker: { color: "#555", symbol, size: 9, line: { width: 1, color: "#333" } } });
    });
    if (retrained.length) {
      for (const words of new Set(retrained.map((t) => t.retrained_fidelity))) {
        keys.push({ ...base, ...empty, mode: "markers", name: words, legendgroup: "fidelity",
          legendgrouptitle: { text: `validation ${data.run.quality}` }, hoverinfo: "skip",
          marker: { color: RETRAINED.color, symbol: RETRAINED.symbol, size: 9, line: { width: 1, color: "#000" } } });
      }
    }
    return keys;
  }

  // The points of one trial as a plot shows them: its search score and, where retrained, that score.
  function marks(trial, cost, floor) {
    const at = [];
    if (trial[cost] == null) return at;
    at.push(trial.quality ?? floor);
    if (trial.retrained != null) at.push(trial.retrained);
    return at;
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

  function kneeWords() {
    const retrained = byNumber.get(data.knee)?.retrained != null;
    return retrained ? "the knee of the retrained front" : "the front's knee";
  }

  function drawFront(cost, name) {
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
    // Front members retrained after the search: their retrained score, joined to the search's by a dotted line
    const retrained = trials.filter((t) => t.retrained != null);
    if (retrained.length) {
      traces.push({ type: "scatter", mode: "lines", showlegend: false, hoverinfo: "skip",
        x: retrained.flatMap((t) => [t[cost], t[cost], null]),
        y: retrained.flatMap((t) => [t.quality, t.retrained, null]),
        line: { dash: "dot", color: RETRAINED.color, width: 1 } });
      traces.push({ type: "scatter", mode: "markers", name: "retrained", showlegend: false,
        x: retrained.map((t) => t[cost]), y: retrained.map((t) => t.retrained), customdata: retrained.map((t) => t.number),
        hovertext: retrained.map(hoverText), hoverinfo: "text",
        marker: { symbol: RETRAINED.symbol, size: RETRAINED.size, color: RETRAINED.color, line: { color: "#000", width: 1 } } });
    }
    if (selected != null && byNumber.has(selected)) {
      const trial = byNumber.get(selected);
      const ys = marks(trial, cost, floor);
      traces.push({ type: "scatter", mode: "markers", name: "selected", showlegend: false, hoverinfo: "skip",
        x: ys.map(() => trial[cost]), y: ys, marker: HIGHLIGHT });
    }
    traces.push(...legendKeys(trials, front, { type: "scatter" }, retrained));
    const shapes = [];
    const annotations = [];
    const budget = { params: data.run.budget_params, macs: data.run.budget_macs }[cost];
    if (budget) {
      const b = budgetShape(budget, count(budget));
      shapes.push(b.shape);
      annotations.push(b.annotation);
    }
    // data.knee is best.yaml's trial: the retrained knee once the front was retrained, else the search's knee
    const marked = new Map();
    if (data.knee != null) marked.set(data.knee, `best.yaml: ${kneeWords()}, trial ${data.knee}`);
    if (data.search_knee != null && data.search_knee !== data.knee) marked.set(data.search_knee, `knee by search score, trial ${data.search_knee}`);
    if (selected != null && !marked.has(selected)) marked.set(selected, `selected: trial ${selected}`);
    for (const [n, text] of marked) {
      const trial = byNumber.get(n);
      const y = n === data.knee && trial && trial.retrained != null ? trial.retrained : trial && trial.quality;
      if (trial && trial[cost] != null && y != null) {
        // Annotations on a log axis take log10 coordinates (shapes take data values).
        const below = n === data.search_knee && n !== data.knee;  // two labels close together: one above, one below
        annotations.push({ x: Math.log10(trial[cost]), y, text, arrowhead: 2, ax: 30, ay: below ? 35 : -30,
          bgcolor: "rgba(255,255,255,0.8)" });
      }
    }
    Plotly.react(element, traces, {
      title: title(`${data.run.quality} vs ${name}`),
      xaxis: { title: { text: costTitle(cost) }, type: "log", exponentformat: "SI", automargin: true },
      yaxis: { title: { text: scoreTitle() }, automargin: true },
      shapes, annotations, uirevision: "keep", hovermode: "closest",
      legend: { orientation: "h", y: -0.22, yanchor: "top", itemclick: false, itemdoubleclick: false, font: { size: 11 } },
      margin: { t: TOP, r: 20, b: 20 },
    }, PLOT_CONFIG);
    bindClick(element);
  }

  function draw3d() {
    const trials = data.trials.filter((t) => FINISHED.has(t.state) && t.params != null && t.macs != null);
    const floor = qualityFloor();
    const front = new Set(data.fronts.params);
    const traces = categoryTraces(trials, front,
      { x: (t) => t.params, y: (t) => t.macs, z: (t) => t.quality ?? floor }, { type: "scatter3d" });
    for (const trace of traces) trace.marker.size = Math.max(3, trace.marker.size / 2);
    const retrained = trials.filter((t) => t.retrained != null);
    if (retrained.length) {
      traces.push({ type: "scatter3d", mode: "markers", name: "retrained", showlegend: false,
        x: retrained.map((t) => t.params), y: retrained.map((t) => t.macs), z: retrained.map((t) => t.retrained),
        customdata: retrained.map((t) => t.number), hovertext: retrained.map(hoverText), hoverinfo: "text",
        marker: { symbol: RETRAINED.symbol, size: 5, color: RETRAINED.color } });
    }
    traces.push(...legendKeys(trials, front, { type: "scatter3d" }, retrained));
    // The camera stands back from its default so the axis titles stay inside the plot.
    Plotly.react($("view3d"), traces, {
      title: title(`3D view: params × MACs at ${inputSize()} × validation ${data.run.quality}`),
      scene: { xaxis: { title: { text: "params" }, type: "log", exponentformat: "SI" },
        yaxis: { title: { text: "MACs" }, type: "log", exponentformat: "SI" },
        zaxis: { title: { text: `validation ${data.run.quality}` } },
        camera: { eye: { x: 1.55, y: 1.55, z: 0.95 }, center: { x: 0, y: 0, z: -0.1 } },
        aspectmode: "cube" },
      legend: { orientation: "h", y: 0, yanchor: "top", itemclick: false, itemdoubleclick: false, font: { size: 11 } },
      uirevision: "keep", margin: { t: TOP, l: 10, r: 10, b: 10 },
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
      title: title("Hypervolume over time (search scores, normalized objectives)"),
      xaxis: { title: { text: "finished feasible trials" } }, yaxis: { title: { text: "hypervolume" }, rangemode: "tozero" },
      uirevision: "keep", margin: { t: TOP, r: 20 },
    }, PLOT_CONFIG);
  }

  // psc-search --prescreen: every architecture the zero-cost proxy scored before any training, against its
  // parameter count; those it queued for training are filled and click through to their trial.
  function drawPrescreen() {
    const screen = data.prescreen;
    $("prescreen-section").hidden = !screen;
    if (!screen) return;
    const trialOf = new Map(data.trials.filter((t) => t.arch_hash && t.state === "COMPLETE")
      .map((t) => [t.arch_hash, t.number]));
    const trace = (queued) => {
      const rows = screen.rows.filter((r) => r.queued === queued && r.score != null);
      return {
        type: "scatter", mode: "markers", name: queued ? "queued for training" : "screened only",
        meta: queued ? "prescreen-queued" : "prescreen-screened",
        x: rows.map((r) => r.params), y: rows.map((r) => r.score),
        customdata: rows.map((r) => (trialOf.has(r.arch_hash) ? trialOf.get(r.arch_hash) : null)),
        text: rows.map((r) => `${r.arch_hash}<br>${count(r.params)} params, ${count(r.macs)} MACs` +
          (trialOf.has(r.arch_hash) ? `<br>trial ${trialOf.get(r.arch_hash)}` : "")),
        hovertemplate: `%{text}<br>${screen.proxy} %{y:.4g}<extra></extra>`,
        marker: queued ? { size: 10, color: "#d62728" } : { size: 7, color: "#7f7f7f", symbol: "circle-open" },
      };
    };
    Plotly.react($("prescreen"), [trace(false), trace(true)], {
      title: title(`Pre-screen: ${screen.scored} architectures ranked by ${screen.proxy} at initialisation ` +
        `(no training, ${Math.round(screen.seconds)} s); ${screen.queued} queued for training`),
      xaxis: { title: { text: "params" } }, yaxis: { title: { text: `${screen.proxy} (larger = predicted better)` } },
      uirevision: "keep", margin: { t: TOP, r: 20 },
    }, PLOT_CONFIG);
    bindClick($("prescreen"));
  }

  // One axis per search decision (a block's op) whose answer differs between trials; the others are
  // named in the title. Trials of another network shape (other decisions) are left out.
  function drawParcoords() {
    const scored = data.trials.filter((t) => t.state === "COMPLETE" && t.decisions && t.quality != null);
    if (!scored.length) return Plotly.purge($("parcoords"));
    const names = Object.keys(scored[0].decisions);
    const trials = scored.filter((t) => Object.keys(t.decisions).join() === names.join());
    const varying = names.filter((name) => new Set(trials.map((t) => t.decisions[name])).size > 1);
    const fixed = names.filter((name) => !varying.includes(name));
    const dimensions = varying.map((name) => {
      const labels = [...new Set(trials.map((t) => t.decisions[name]))].sort();
      return { label: name, values: trials.map((t) => labels.indexOf(t.decisions[name])),
        tickvals: labels.map((_, k) => k), ticktext: labels.map((l) => l.replace("orientation=", "")) };
    });
    dimensions.push({ label: "params", values: trials.map((t) => t.params) },
      { label: "MACs", values: trials.map((t) => t.macs) },
      { label: `${data.run.quality} (search)`, values: trials.map((t) => t.quality) });
    const same = fixed.length ? `; same in every trial: ${fixed.map((n) => `${n} = ${trials[0].decisions[n]}`).join(", ")}` : "";
    Plotly.react($("parcoords"), [{
      type: "parcoords", dimensions, labelfont: { size: 12 }, tickfont: { size: 10 },
      line: { color: trials.map((t) => t.quality), colorscale: "Viridis", showscale: true,
        colorbar: { title: { text: data.run.quality, side: "right" }, x: 1.03, xpad: 20 } },
    }], { title: title(`Decisions that vary: ${varying.length} of ${names.length} (color = validation ${data.run.quality}, search)${same}`),
      margin: { t: 90, l: 90, r: 130 }, uirevision: "keep" }, PLOT_CONFIG);
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
      $("arch").dataset.message = "1";
      return;
    }
    if ($("arch").dataset.message) {  // clear the message, never a drawn plot (react would not redraw it)
      $("arch").textContent = "";
      delete $("arch").dataset.message;
    }
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
      title: title("Architecture: each block's output channels by sub-kernel"),
      barmode: "stack", bargap: 0.1, xaxis: { tickangle: -45, automargin: true },
      yaxis: { title: { text: "channel share" }, tickformat: ".0%", range: [0, 1] },
      legend: { title: { text: "sub-kernel" } }, showlegend: true, margin: { t: TOP, r: 20 },
    }, PLOT_CONFIG);
  }

  // The search's learning curve (solid) and, for a retrained trial, the retraining's (dashed).
  function drawCurve(trial) {
    const traces = [];
    const colors = new Map();  // one color per metric, solid for the search, dashed for the retraining
    const curves = [["", trial.curve || [], "solid"], [" (retrained)", trial.retrained_curve || [], "dash"]];
    for (const [suffix, curve, dash] of curves) {
      const keys = [...new Set(curve.flatMap((row) => Object.keys(row)))]
        .filter((k) => k !== "epoch" && k !== "epoch_s" && curve.some((row) => typeof row[k] === "number"));
      const epochs = curve.map((row, i) => row.epoch ?? i);
      for (const key of keys) {
        if (!colors.has(key)) colors.set(key, CURVE_COLORS[colors.size % CURVE_COLORS.length]);
        traces.push({ type: "scatter", mode: "lines+markers", name: `${key}${suffix}`, x: epochs,
          y: curve.map((row) => row[key]), yaxis: key.includes("loss") ? "y2" : "y",
          line: { dash, color: colors.get(key) }, marker: { color: colors.get(key) } });
      }
    }
    const how = trial.retrained_curve ? "solid: search, dashed: retrained" : "search";
    Plotly.react($("curve"), traces, {
      title: title(traces.length ? `Learning curve (${how})` : "Learning curve (none recorded)"),
      xaxis: { title: { text: "epoch" }, automargin: true }, yaxis: { title: { text: "validation metric" } },
      yaxis2: { title: { text: "training loss" }, overlaying: "y", side: "right" },
      legend: { orientation: "h", y: -0.42, yanchor: "top" }, margin: { t: TOP, r: 50 },
    }, PLOT_CONFIG);
  }

  function showTrial(n) {
    const trial = byNumber.get(n);
    if (!trial) return;
    selected = n;
    const role = n === data.knee ? `best.yaml, ${kneeWords()}`
      : n === data.search_knee ? "the knee by search score" : null;
    $("arch-title").textContent = `Trial ${n}: ${trial.summary || "(no architecture)"}`;
    $("arch-role").textContent = role ? `(${role})` : "";
    drawArchitecture(trial);
    drawCurve(trial);
    drawFigures(trial);
    $("trial-config").textContent = trial.config || "";
    $("trial-export").textContent = trial.export;
    COSTS.forEach(([cost, title]) => drawFront(cost, title));
    drawTable();
  }

  // One row per figure; scores in two columns, the search's and the retraining's, each headed by how.
  function drawFigures(trial) {
    const rows = [["", `search (${trial.fidelity_words || "not scored"})`,
      trial.retrained != null ? trial.retrained_fidelity : "retrained"]];
    const search = trial.metrics || {};
    const again = trial.retrained_metrics || {};
    const names = [data.run.quality, ...new Set([...Object.keys(search), ...Object.keys(again)])]
      .filter((k, i, all) => all.indexOf(k) === i);
    const value = (v) => (v == null ? "–" : typeof v === "number" ? number(v) : String(v));
    for (const name of names) {
      const searched = name === data.run.quality ? trial.quality ?? search[name] : search[name];
      rows.push([name, value(searched), trial.retrained != null ? value(again[name]) : "not retrained"]);
    }
    for (const [k, v] of [["state", trial.state], ["params", count(trial.params)],
      [`MACs at ${inputSize()}`, count(trial.macs)], ["latency ms", number(trial.latency_ms, 2)],
      ["preset", trial.preset || "–"], ["hash", trial.arch_hash || "–"], ["fail reason", trial.fail_reason || "–"]]) {
      rows.push([k, v]);
    }
    $("trial-figures").replaceChildren(...rows.map((cells, r) => {
      const tr = document.createElement("tr");
      cells.forEach((text, i) => {
        const td = tr.appendChild(document.createElement(r === 0 ? "th" : "td"));
        td.textContent = text;
        if (cells.length === 2 && i === 1) td.colSpan = 2;
      });
      return tr;
    }));
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
      budgets && `budget ${budgets}`, `trials: ${states || "none yet"}`,
      data.prescreen && `pre-screened ${data.prescreen.scored} by ${data.prescreen.proxy}`].filter(Boolean).join(" · ");
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
    drawPrescreen();
    drawTable();
    // The page opens on the answer: best.yaml's trial (the knee) is selected until the user picks another.
    if (selected == null || !byNumber.has(selected)) selected = byNumber.has(data.knee) ? data.knee : null;
    if (selected != null) showTrial(selected);
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
