// mlwf ui: every page drawn from the JSON API of the server that served it (no library, no build step).
"use strict";

const POLL_MS = 1500;
const TOKEN = document.querySelector('meta[name="mlwf-token"]').content;
const PAGE = document.body.dataset.page;
const main = document.getElementById("main");

// ---------------------------------------------------------------- helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;  // through the CSSOM: the page's CSP allows no style attribute
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const svgEl = (tag, attrs) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
};
const ms = (v) => (v === null || v === undefined) ? "–" : v >= 10000 ? `${(v / 1000).toFixed(1)} s` : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(1)} ms`;
const pct = (v) => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(1)} %`;
function bytes(v) {
  if (v === null || v === undefined || v === "") return "–";
  v = Number(v);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i ? `${v.toFixed(1)} ${units[i]}` : `${v} B`;
}
const when = (t) => t ? t.replace("T", " ").replace(/\.\d+\+00:00$/, " UTC").replace(/\+00:00$/, " UTC") : "–";
const status = (s) => el("span", {class: `status status-${s}`, "data-status": s, text: s});
const runLink = (id) => el("a", {href: `/runs/${encodeURIComponent(id)}`, class: "mono"}, id);
const num = (v, digits = 1) => (v === null || v === undefined || v === "") ? "–" : Number(v).toFixed(digits);
const table = (cls, head, rows) => el("div", {class: "table-wrap"},
  el("table", {class: cls}, el("thead", {}, el("tr", {}, head.map((h) => typeof h === "string" ? el("th", {}, h) : h))),
     el("tbody", {}, rows)));

async function api(path, options) {
  const response = await fetch(path, {credentials: "same-origin", cache: "no-store", ...options});
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: `${response.status} ${response.statusText}`}; }
  if (!response.ok) throw new Error(body && body.error ? body.error : `${response.status}`);
  return body;
}
function setMain(...children) {
  main.replaceChildren(...children.flat());
}
function poll(fn) {
  let stopped = false;
  async function tick() {
    if (stopped) return;
    let again = true;
    try { again = (await fn()) !== false; } catch (e) { showProblem(e); }
    if (again && !stopped) setTimeout(tick, POLL_MS);
  }
  tick();
  return () => { stopped = true; };
}
function showProblem(error) {
  let box = document.getElementById("problem");
  if (!box) { box = el("div", {id: "problem", class: "error-box", role: "alert"}); main.prepend(box); }
  box.textContent = `Could not reach the dashboard's server: ${error.message}`;
}
function clearProblem() { const box = document.getElementById("problem"); if (box) box.remove(); }
function stageClasses(names) {
  const out = {};
  names.forEach((n, i) => { out[n] = `s${i % 8}`; });
  return out;
}

for (const a of document.querySelectorAll("header nav a")) {
  if (a.dataset.nav === PAGE || (PAGE === "run" && a.dataset.nav === "runs")) a.classList.add("active");
}

// ---------------------------------------------------------------- the runs list
function runsPage() {
  const params = new URLSearchParams(location.search);
  const state = {q: params.get("q") || "", workflow: params.get("workflow") || "", status: params.get("status") || "",
                 backend: params.get("backend") || "", page: Number(params.get("page") || 1)};
  const selected = new Set();
  const search = el("input", {type: "search", id: "filter-q", placeholder: "Filter by id, workflow, backend, transfer, status",
                              value: state.q, "aria-label": "Filter"});
  const selects = {};
  for (const name of ["workflow", "status", "backend"]) {
    selects[name] = el("select", {id: `filter-${name}`, "aria-label": name}, el("option", {value: ""}, `any ${name}`));
  }
  const compare = el("button", {id: "compare-selected", class: "primary", disabled: true,
                                onclick: () => { location.href = `/compare?runs=${[...selected].join(",")}`; }}, "Compare selected");
  const count = el("span", {class: "muted", id: "runs-count"});
  const tbody = el("tbody", {id: "runs-body"});
  const pager = el("div", {class: "pager"});
  setMain(el("h1", {}, "Runs"),
    el("div", {class: "filters"}, search, Object.values(selects), compare, count),
    el("div", {class: "table-wrap"}, el("table", {id: "runs"},
      el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "Run"), el("th", {}, "Workflow"),
        el("th", {class: "hide-narrow"}, "Backend"), el("th", {class: "hide-narrow"}, "Transfer"), el("th", {}, "Status"),
        el("th", {class: "hide-narrow"}, "Started"), el("th", {class: "num"}, "Duration"), el("th", {class: "num"}, "Accuracy"),
        el("th", {class: "hide-narrow"}, "Progress"))),
      tbody)),
    pager);

  let refresh = null;
  const changed = () => {
    state.q = search.value; state.page = 1;
    for (const [name, sel] of Object.entries(selects)) state[name] = sel.value;
    const shown = new URLSearchParams(Object.entries(state).filter(([k, v]) => v && !(k === "page" && v === 1)));
    history.replaceState(null, "", shown.toString() ? `/?${shown}` : "/");
    if (refresh) refresh();
  };
  search.addEventListener("input", changed);
  for (const sel of Object.values(selects)) sel.addEventListener("change", changed);

  function fillSelect(sel, values, current) {
    const have = [...sel.options].slice(1).map((o) => o.value).join("\n");
    if (have === values.join("\n")) return;
    sel.replaceChildren(sel.options[0], ...values.map((v) => el("option", {value: v}, v)));
    sel.value = values.includes(current) ? current : "";
  }

  async function load() {
    const query = new URLSearchParams({q: state.q, workflow: state.workflow, status: state.status,
                                       backend: state.backend, page: state.page});
    const data = await api(`/api/runs?${query}`);
    clearProblem();
    fillSelect(selects.workflow, data.workflows, state.workflow);
    fillSelect(selects.status, data.statuses, state.status);
    fillSelect(selects.backend, data.backends, state.backend);
    count.textContent = data.total === data.all ? `${data.all} runs` : `${data.total} of ${data.all} runs`;
    tbody.replaceChildren(...data.runs.map((r) => {
      const box = el("input", {type: "checkbox", "aria-label": `select ${r.run_id}`, checked: selected.has(r.run_id),
        onchange: (e) => { e.target.checked ? selected.add(r.run_id) : selected.delete(r.run_id); compare.disabled = selected.size < 2; }});
      // One short figure (calls done of all), the stages in its tooltip: the column fits a 1280-wide window.
      const stages = Object.entries(r.progress || {});
      const [done, total] = stages.reduce(([d, t], [, p]) => { const [a, b] = p.split("/").map(Number); return [d + (a || 0), t + (b || 0)]; }, [0, 0]);
      const progress = el("span", {title: stages.map(([s, p]) => `${s} ${p}`).join(" · ")}, stages.length ? `${done}/${total} calls` : "–");
      return el("tr", {"data-run-id": r.run_id, "data-status": r.status, "data-workflow": r.workflow},
        el("td", {}, box), el("td", {}, runLink(r.run_id)), el("td", {}, r.workflow),
        el("td", {class: "hide-narrow"}, r.backend || "–"), el("td", {class: "hide-narrow"}, r.transfer || "–"),
        el("td", {}, status(r.status)), el("td", {class: "hide-narrow"}, when(r.started_at)),
        el("td", {class: "num"}, ms(r.duration_ms)), el("td", {class: "num", "data-accuracy": r.accuracy ?? ""}, pct(r.accuracy)),
        el("td", {class: "hide-narrow muted"}, progress));
    }));
    if (!data.runs.length) tbody.append(el("tr", {}, el("td", {colspan: 10, class: "muted"},
      data.all ? "No run matches the filter." : "No runs in this store yet: start one with 'mlwf run'.")));
    state.page = data.page;
    pager.replaceChildren(
      el("button", {disabled: data.page <= 1, onclick: () => { state.page--; refresh(); }}, "‹ Newer"),
      el("span", {class: "muted", id: "runs-page"}, `page ${data.page} of ${data.pages}`),
      el("button", {disabled: data.page >= data.pages, onclick: () => { state.page++; refresh(); }}, "Older ›"));
  }
  let stop = poll(load);
  refresh = () => { stop(); stop = poll(load); };
}

// ---------------------------------------------------------------- one run
function runPage() {
  const runId = document.body.dataset.runId;
  let drawnTrace = false;
  poll(async () => {
    const run = await api(`/api/runs/${encodeURIComponent(runId)}`);
    clearProblem();
    drawRun(run, drawnTrace);
    drawnTrace = drawnTrace || run.calls !== null;
    return run.status === "running";  // a run that ended changes no more
  });
}

function drawRun(run, keepGantt) {
  const report = run.report || {};
  const accuracy = run.workflow === "ml-training" ? report.validation_accuracy : report.accuracy;
  const stageNames = Object.keys(run.progress || {});
  const classes = stageClasses(stageNames);
  const oldGantt = document.getElementById("gantt-section");
  const sections = [
    el("h1", {}, `${run.workflow} `, el("span", {class: "mono"}, run.run_id), " ", status(run.status)),
    el("section", {class: "card"}, el("dl", {class: "facts"},
      fact("Backend", run.backend || "–"), fact("Transfer", run.transfer || "–"), fact("Started", when(run.started_at)),
      fact("Duration", ms(run.duration_ms)), fact("Accuracy", el("span", {id: "accuracy", "data-value": accuracy ?? ""}, pct(accuracy))),
      fact("Resumed", run.resumed ? "yes" : "no"), fact("Mode", run.mode === "choreography" ? "choreography (no driver)" : "driver"))),
  ];
  if (run.status === "failed" || run.error) {
    sections.push(el("div", {class: "error-box", id: "failure", role: "alert"},
      el("strong", {}, run.failed_stage ? `Failed in stage ${run.failed_stage}: ` : "Failed: "), run.error || "no reason recorded"));
  }
  if (run.resume) {  // an interrupted or abandoned run that --resume can finish: the command that does
    sections.push(el("section", {class: "card"}, el("h2", {}, "Resume"),
      el("p", {}, "Finish this run, reusing the calls it made, with:"), el("pre", {id: "resume", class: "mono"}, run.resume)));
  }
  sections.push(el("section", {class: "card", id: "stages"}, el("h2", {}, "Stages"),
    stageNames.length ? stageNames.map((s) => {
      const [done, total] = run.progress[s].split("/").map(Number);
      const st = (report.stages || {})[s] || {};
      return el("div", {class: "progress", "data-stage": s, "data-done": done, "data-total": total},
        el("span", {class: "label legend"}, el("span", {class: classes[s]}, s)),
        el("span", {class: "bar"}, el("span", {class: "fill", style: `width:${total ? (100 * done / total) : 0}%`})),
        el("span", {class: "count"}, `${done}/${total}`),
        el("span", {class: "muted"}, st.wall_ms !== undefined ? `${ms(st.wall_ms)}${st.attempts > st.calls ? ` · ${st.attempts - st.calls} retries` : ""}` : ""));
    }) : el("p", {class: "muted"}, "No stage has started.")));
  if (keepGantt && oldGantt) sections.push(oldGantt);
  else sections.push(ganttSection(run, classes));
  const conf = run.confusion;
  if (conf) sections.push(el("section", {class: "card"}, el("h2", {}, "Confusion matrix"),
    el("p", {class: "muted"}, "Rows: the true class; columns: the predicted one."), confusionTable(conf)));
  if (run.workflow === "ml-inference" && run.report) {
    sections.push(el("section", {class: "card", id: "predictions"}, el("h2", {}, "Predictions"), el("dl", {class: "facts"},
      fact("Images", report.num_images), fact("Predicted", report.num_predicted), fact("Labelled", report.num_labelled),
      fact("Skipped", report.skipped), fact("Accuracy", pct(report.accuracy)), fact("Functions", report.num_funcs),
      fact("Model", el("span", {class: "mono"}, String(report.model_digest || "").slice(0, 12))),
      fact("Results", el("span", {class: "mono"}, report.results_key || "–")))));
  }
  if (run.edges && run.edges.length) {
    sections.push(el("section", {class: "card"}, el("h2", {}, "State transfer per edge"), table("edges",
      ["Edge", el("th", {class: "num"}, "Bytes"), el("th", {class: "num"}, "Serialize"), el("th", {class: "num"}, "Transfer"),
       el("th", {class: "num"}, "Deserialize")],
      run.edges.map((e) => el("tr", {"data-edge": `${e.from}→${e.to}`}, el("td", {}, `${e.from} → ${e.to}`),
        el("td", {class: "num"}, bytes(e.bytes)), el("td", {class: "num"}, ms(e.serialize_ms)),
        el("td", {class: "num"}, ms(e.transfer_ms)), el("td", {class: "num"}, ms(e.deserialize_ms)))))));
  }
  sections.push(el("section", {class: "card"}, el("h2", {}, "Parameters"), table("params", ["Name", "Value"],
    Object.entries(run.params || {}).map(([k, v]) => el("tr", {}, el("td", {}, k),
      el("td", {class: "mono"}, typeof v === "object" ? JSON.stringify(v) : String(v)))))));
  sections.push(el("section", {class: "card"}, el("h2", {}, "Outputs"), table("outputs", ["What", "Key"],
    Object.entries(run.outputs || {}).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {class: "mono"}, v))))));
  setMain(sections);
}

function fact(name, value) {
  return el("div", {}, el("dt", {}, name), el("dd", {}, value ?? "–"));
}

function ganttSection(run, classes) {
  const section = el("section", {class: "card", id: "gantt-section"}, el("h2", {}, "Calls"));
  if (run.calls === null) {
    section.append(el("p", {class: "muted"}, run.status === "running"
      ? "The calls are drawn once the run ends (its driver writes its trace then)."
      : "This run kept no trace and no done records to draw its calls from (a run with --transfer other than store from before traces were kept)."));
    return section;
  }
  const calls = run.calls;
  // From the first call on: a cold run's worker start-up before it would squeeze every call to the right.
  const first = calls.length ? Math.min(...calls.map((c) => c.start_ms)) : 0;
  const end = Math.max(1e-3, Math.max(0, ...calls.map((c) => c.start_ms + c.duration_ms)) - first);
  const lanes = [...new Set(calls.map((c) => c.lane))].sort();
  const stages = [...new Set(calls.map((c) => c.stage))];
  for (const s of stages) if (!(s in classes)) classes[s] = `s${Object.keys(classes).length % 8}`;
  section.append(
    el("p", {}, `${calls.length} calls on ${new Set(calls.map((c) => c.worker)).size} workers over ${ms(end)}` +
      (first > 1 ? `, the first ${ms(first)} after the run started. ` : ". "),
      run.trace ? [el("a", {href: `/api/runs/${encodeURIComponent(run.run_id)}/trace.json`, download: `${run.run_id}.trace.json`,
        id: "trace-download"}, "Download the Perfetto trace"), el("span", {class: "muted"}, " (open it in Perfetto or chrome://tracing)")]
        : el("span", {class: "muted", id: "from-done-records"}, "Drawn from the run's done records: it kept no trace.")),
    el("div", {class: "legend"}, stages.map((s) => el("span", {class: classes[s]}, s))),
    el("div", {class: "gantt", id: "gantt", "data-calls": calls.length},
      lanes.map((lane) => el("div", {class: "lane"}, el("span", {class: "lane-name", title: lane}, lane),
        el("span", {class: "track"}, calls.filter((c) => c.lane === lane).map((c) => el("span", {
          class: `call ${classes[c.stage]}${c.attempts > 1 ? " retried" : ""}`,
          style: `left:${(100 * (c.start_ms - first) / end).toFixed(3)}%;width:${(100 * c.duration_ms / end).toFixed(3)}%`,
          title: `${c.name} on ${c.worker}: starts at ${ms(c.start_ms)}, takes ${ms(c.duration_ms)}` +
                 (c.attempts > 1 ? `, ${c.attempts} attempts` : ""),
          "data-name": c.name, "data-stage": c.stage, "data-index": c.index, "data-worker": c.worker,
          "data-start-ms": c.start_ms, "data-duration-ms": c.duration_ms, "data-attempts": c.attempts}))))),
      el("div", {class: "axis"}, [0, 0.25, 0.5, 0.75, 1].map((f) => el("span", {}, ms(first + f * end))))));
  return section;
}

function confusionTable(conf) {
  const labels = conf.labels;
  return el("div", {class: "table-wrap"}, el("table", {class: "confusion", id: "confusion"},
    el("thead", {}, el("tr", {}, el("th", {}, "true \\ predicted"), labels.map((l) => el("th", {class: "num", scope: "col"}, l)))),
    el("tbody", {}, conf.matrix.map((row, i) => el("tr", {"data-class": labels[i]}, el("th", {scope: "row"}, labels[i]),
      row.map((n, j) => el("td", {class: i === j ? "diag" : n ? "off" : "", "data-true": labels[i], "data-predicted": labels[j]}, n)))))));
}

// ---------------------------------------------------------------- models
function modelsPage() {
  setMain(el("h1", {}, "Models"), el("div", {id: "models"}, el("p", {class: "muted"}, "Reading the published models…")));
  loadModels();
}

async function loadModels(note) {
  let data;
  try { data = await api("/api/models"); } catch (e) { showProblem(e); return; }
  const box = document.getElementById("models");
  if (!data.models.length) {
    box.replaceChildren(el("p", {class: "muted"}, "No model is published yet: 'mlwf run ml-training' publishes one."));
    return;
  }
  box.replaceChildren(...(note ? [note] : []), ...data.models.map(modelCard));
}

function modelCard(model) {
  const card = el("section", {class: "card model", "data-prefix": model.prefix}, el("h2", {}, el("span", {class: "mono"}, model.prefix)));
  if (model.error) { card.append(el("div", {class: "error-box"}, model.error)); return card; }
  const versions = [model.current, ...model.history];
  card.append(table("versions", ["", "Digest", el("th", {class: "num hide-narrow"}, "Size"), "Published",
      el("th", {class: "num"}, "Accuracy"), "Run"],
    versions.map((v, i) => el("tr", {"data-sha256": v.sha256, class: i === 0 ? "current" : ""},
      el("td", {}, i === 0 ? el("strong", {}, "current") : `−${i}`),
      el("td", {class: "mono", title: v.sha256}, v.sha256.slice(0, 16)), el("td", {class: "num hide-narrow"}, bytes(v.size)),
      el("td", {}, when(v.published_at)), el("td", {class: "num"}, pct(v.accuracy)),
      el("td", {}, v.run_id ? runLink(v.run_id) : "–")))));
  const area = el("div", {class: "rollback-area"});
  const previous = model.history[0];
  const button = el("button", {class: "rollback", disabled: !previous, onclick: () => {
    button.disabled = true;
    area.replaceChildren(el("div", {class: "confirm", role: "dialog"},
      el("p", {}, "Make ", el("span", {class: "mono"}, previous.sha256.slice(0, 16)), ` (run ${previous.run_id || "–"}) the current model at `,
        el("span", {class: "mono"}, model.prefix), " again, in place of ", el("span", {class: "mono"}, model.current.sha256.slice(0, 16)),
        "? Services watching it pick it up."),
      el("button", {class: "danger confirm-rollback", onclick: (e) => rollback(model, e.target, area)}, "Roll back"), " ",
      el("button", {class: "cancel", onclick: () => { area.replaceChildren(); button.disabled = false; }}, "Cancel")));
  }}, previous ? "Roll back to the previous version…" : "No earlier version to roll back to");
  card.append(el("p", {}, button), area);
  return card;
}

async function rollback(model, confirmButton, area) {
  confirmButton.disabled = true;
  try {
    const done = await api("/api/models/rollback", {method: "POST",
      headers: {"Content-Type": "application/json", "X-MLWF-Token": TOKEN},
      body: JSON.stringify({prefix: model.prefix, expected: model.current.sha256})});
    loadModels(el("div", {class: "ok-box", id: "rollback-result", role: "status"},
      `Rolled back ${done.prefix}: ${done.sha256.slice(0, 16)} is current again (it replaced ${done.replaced.slice(0, 16)}).`));
  } catch (e) {
    area.replaceChildren(el("div", {class: "error-box", id: "rollback-error", role: "alert"}, `Not rolled back: ${e.message}`),
      el("button", {onclick: () => loadModels()}, "Look again"));
  }
}

// ---------------------------------------------------------------- compare
function comparePage() {
  const ids = (new URLSearchParams(location.search).get("runs") || "").split(",").filter(Boolean);
  setMain(el("h1", {}, "Compare"), el("div", {id: "compare"}), el("div", {id: "bench"}));
  drawCompare(ids);
  drawBench();
}

function bars(items, unit) {
  const width = 640, row = 22, label = 230, max = Math.max(1, ...items.map((i) => i.value || 0));
  const svg = svgEl("svg", {class: "bars", viewBox: `0 0 ${width} ${items.length * row + 6}`, role: "img"});
  items.forEach((item, i) => {
    const y = i * row + 3, w = (width - label - 90) * (item.value || 0) / max;
    const t = svgEl("text", {x: 0, y: y + 14}); t.textContent = item.label; svg.append(t);
    svg.append(svgEl("rect", {class: "bar", x: label, y, width: Math.max(1, w), height: row - 6, "data-label": item.label, "data-value": item.value}));
    const v = svgEl("text", {x: label + w + 6, y: y + 14}); v.textContent = unit(item.value); svg.append(v);
  });
  return svg;
}

async function drawCompare(ids) {
  const box = document.getElementById("compare");
  if (ids.length < 1) {
    box.replaceChildren(el("p", {class: "muted"}, "Pick two or more runs in the ", el("a", {href: "/"}, "runs list"),
      " and press “Compare selected”."));
    return;
  }
  let data;
  try { data = await api(`/api/compare?runs=${ids.map(encodeURIComponent).join(",")}`); } catch (e) { showProblem(e); return; }
  const runs = data.runs;
  const parts = [];
  if (data.missing.length) parts.push(el("div", {class: "error-box"}, `No such run: ${data.missing.join(", ")}`));
  const stages = [...new Set(runs.flatMap((r) => Object.keys(r.stage_ms)))];
  const head = ["", ...runs.map((r) => el("th", {class: "num"}, runLink(r.run_id)))];
  const row = (name, f) => el("tr", {"data-metric": name}, el("th", {scope: "row"}, name), runs.map((r) => el("td", {class: "num"}, f(r))));
  parts.push(el("section", {class: "card"}, el("h2", {}, "Side by side"), table("compare-table", head, [
    row("workflow", (r) => r.workflow), row("backend", (r) => r.backend || "–"), row("transfer", (r) => r.transfer || "–"),
    row("status", (r) => status(r.status)), row("end to end", (r) => ms(r.e2e_ms ?? r.duration_ms)),
    row("accuracy", (r) => pct(r.accuracy)), ...stages.map((s) => row(`stage ${s}`, (r) => ms(r.stage_ms[s])))]),
    el("h2", {}, "End to end"), bars(runs.map((r) => ({label: r.run_id.slice(0, 22), value: r.e2e_ms ?? r.duration_ms})), ms)));
  const edges = [...new Set(runs.flatMap((r) => r.edges.map((e) => `${e.from} → ${e.to}`)))];
  if (edges.length) {
    const cell = (r, edge, f) => { const e = r.edges.find((x) => `${x.from} → ${x.to}` === edge); return e ? f(e) : "–"; };
    parts.push(el("section", {class: "card"}, el("h2", {}, "Per edge: bytes · serialize · transfer · deserialize"),
      table("compare-edges", ["Edge", ...runs.map((r) => el("th", {}, runLink(r.run_id)))],
        edges.map((edge) => el("tr", {"data-edge": edge}, el("th", {scope: "row"}, edge), runs.map((r) => el("td", {class: "mono"},
          cell(r, edge, (e) => `${bytes(e.bytes)} · ${ms(e.serialize_ms)} · ${ms(e.transfer_ms)} · ${ms(e.deserialize_ms)}`))))))));
  }
  box.replaceChildren(...parts);
}

async function drawBench() {
  let data;
  try { data = (await api("/api/bench")).bench; } catch (e) { showProblem(e); return; }
  if (!data) return;
  const box = document.getElementById("bench");
  if (data.error) {
    box.replaceChildren(el("section", {class: "card"}, el("h2", {}, "Benchmark ", el("span", {class: "mono"}, data.folder)),
      el("p", {class: "error-box", role: "alert"}, data.error)));
    return;
  }
  const config = (r) => `${r.backend}/${r.transfer}${r.state && r.state !== "light" ? "/" + r.state : ""} ${r.workflow} ${r.mode}`;
  box.replaceChildren(el("section", {class: "card"}, el("h2", {}, "Benchmark ", el("span", {class: "mono"}, data.folder)),
    table("bench-summary", ["Configuration", el("th", {class: "num"}, "Runs"), el("th", {class: "num"}, "Median"),
      el("th", {class: "num"}, "Min"), el("th", {class: "num"}, "Max"), el("th", {class: "num"}, "Accuracy")],
      data.summary.map((r) => el("tr", {"data-config": config(r)}, el("td", {}, config(r)), el("td", {class: "num"}, r.runs),
        el("td", {class: "num"}, ms(Number(r.median_ms))), el("td", {class: "num"}, ms(Number(r.min_ms))),
        el("td", {class: "num"}, ms(Number(r.max_ms))), el("td", {class: "num"}, r.accuracy ? pct(Number(r.accuracy)) : "–")))),
    el("h2", {}, "Median end to end"),
    bars(data.summary.map((r) => ({label: config(r), value: Number(r.median_ms)})), ms),
    data.edges.length ? [el("h2", {}, "Per edge (median of the runs)"), table("bench-edges",
      ["Configuration", "Edge", el("th", {class: "num"}, "Bytes"), el("th", {class: "num"}, "Serialize"),
       el("th", {class: "num"}, "Transfer"), el("th", {class: "num"}, "Deserialize")],
      data.edges.map((e) => el("tr", {}, el("td", {}, config(e)), el("td", {}, e.edge), el("td", {class: "num"}, bytes(e.bytes)),
        el("td", {class: "num"}, ms(e.serialize_ms)), el("td", {class: "num"}, ms(e.transfer_ms)),
        el("td", {class: "num"}, ms(e.deserialize_ms)))))] : []));
}

// ---------------------------------------------------------------- start
const PAGES = {runs: runsPage, run: runPage, models: modelsPage, compare: comparePage};
if (PAGES[PAGE]) PAGES[PAGE]();
