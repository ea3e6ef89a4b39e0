// SIE's page: the server's status and a playground for a model's outputs. Plain JS, no
// network beyond this origin; every number comes from the server's own routes.
"use strict";

// How /v1/score is told what ranks, in one place. Today the option is `score_type` and the
// modes are the model's `score_types` from /v1/models. (SIE calls it `options.score_mode`,
// with modes dense|sparse|colbert|hybrid: switching is these two lines.)
const SCORE = {
  option: "score_type",
  modes: (model) => model.score_types || [],
};
const KEY_STORE = "sie-api-key"; // sessionStorage: this tab only
const POLL_MS = 3000;
const WINDOW_S = 30; // throughput over this many seconds of status samples
const TOP_TERMS = 10;
const MAX_TEXTS = 32; // a heatmap of n x n cells stays readable (and drawable)
const MAX_ALIGN_CELLS = 40000; // query tokens x text tokens drawn at most
const SAMPLE_TEXTS = [
  "BGE-M3 gives dense, sparse and multivector outputs from one forward pass.",
  "BM25 ranks documents by how often the query's terms occur in them.",
  "The weather in Lisbon is mild in winter.",
];
const SAMPLE_QUERY = "Which model gives sparse and multivector outputs?";

const $ = (id) => document.getElementById(id);
const state = { models: [], status: null, samples: [], timer: null };

// ------------------------------------------------------------------ talking to the server

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function modelPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

// GET (no body) or POST JSON; the tab's API key goes in the Authorization header only.
// A refusal throws ApiError with the server's own code and message.
async function api(path, body) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  const init = { headers, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // not JSON (e.g. a plain 431): the text is the message
  }
  if (!response.ok) {
    const detail = data && (data.detail || data.error);
    const code = (detail && detail.code) || String(response.status);
    const message = detail && typeof detail === "object" ? detail.message : text || response.statusText;
    throw new ApiError(response.status, code, message);
  }
  return data;
}

// ------------------------------------------------------------------ small DOM helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  if (err instanceof ApiError) {
    box.append(h("strong", { text: err.code }), ` (HTTP ${err.status}): ${err.message}`);
  } else {
    box.append(String(err.message || err));
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log10(n) / 3));
  return `${(n / 1000 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function snippet(text, n = 60) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

// ------------------------------------------------------------------ API key

function askForKey(err) {
  stopPolling();
  const hadKey = sessionStorage.getItem(KEY_STORE) !== null;
  sessionStorage.removeItem(KEY_STORE);
  $("status").hidden = $("playground").hidden = true;
  $("forget-key").hidden = true;
  $("key-section").hidden = false;
  $("key-reason").textContent = hadKey
    ? "The server refused this key. Enter another one."
    : "This server needs an API key for everything but its health probes.";
  showError(err);
  $("key-input").focus();
}

function useKey(event) {
  event.preventDefault();
  const input = $("key-input");
  const key = input.value.trim();
  input.value = "";
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("key-section").hidden = true;
  clearError();
  connect();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  connect();
}

// ------------------------------------------------------------------ status

async function connect() {
  let listed, status;
  try {
    [listed, status] = await Promise.all([api("/v1/models"), api("/status")]);
  } catch (err) {
    if (err.status === 401) return askForKey(err);
    return showError(err);
  }
  $("forget-key").hidden = sessionStorage.getItem(KEY_STORE) === null;
  $("status").hidden = $("playground").hidden = false;
  state.samples = [];
  setModels(listed.models);
  renderStatus(status);
  startPolling();
}

function setModels(models) {
  state.models = models;
  const select = $("model");
  const previous = select.value;
  const usable = models.filter((m) => encodeTypes(m).length);
  select.replaceChildren(...usable.map((m) => h("option", { value: m.name, text: m.name })));
  const preferred = usable.find((m) => m.name === previous)
    || usable.find((m) => m.loaded && encodeTypes(m).includes("multivector"))
    || usable.find((m) => m.loaded) || usable[0];
  if (preferred) select.value = preferred.name;
  setOutputChoices();
}

function encodeTypes(model) {
  return (model.outputs || []).filter((t) => t !== "score");
}

function startPolling() {
  stopPolling();
  state.timer = setInterval(poll, POLL_MS);
}

function stopPolling() {
  if (state.timer !== null) clearInterval(state.timer);
  state.timer = null;
}

// A failed refresh is said in the status panel (the playground's errors stay where they
// are) and the next one is tried as usual.
async function poll() {
  if (document.hidden) return;
  const note = $("status-error");
  try {
    renderStatus(await api("/status"));
    note.hidden = true;
  } catch (err) {
    if (err.status === 401) return askForKey(err);
    note.textContent = `Refreshing failed: ${err instanceof ApiError ? `${err.code}: ` : ""}${err.message}`;
    note.hidden = false;
  }
}

// Rate of a counter over the samples of the last WINDOW_S seconds (null until two samples).
function rate(name, key) {
  const s = state.samples;
  if (s.length < 2) return null;
  const first = s[0], last = s[s.length - 1];
  const dt = last.time - first.time;
  const a = first.models[name], b = last.models[name];
  return dt > 0 && a && b ? (b[key] - a[key]) / dt : null;
}

function renderStatus(status) {
  state.status = status;
  state.samples.push(status);
  while (state.samples.length > 2 && status.time - state.samples[0].time > WINDOW_S) state.samples.shift();
  const facts = [
    ["Version", status.version],
    ["Device", status.device],
    ["Dtype", status.dtype, status.dtype_reason],
    ["Up", duration(status.uptime_s)],
    ["Memory budget", bytes(status.memory_budget_bytes)],
    ["Batch budget", `${status.max_batch_tokens} tokens`],
    ["Updated", new Date(status.time * 1000).toLocaleTimeString()],
  ];
  $("server-facts").replaceChildren(...facts.flatMap(([k, v, title]) => [
    h("dt", { text: k }), h("dd", { text: v, title }),
  ]));
  renderModels(status);
  renderErrors(status);
}

// Models loaded (or loading, or failed) in the main table with their live counters; the
// rest of the catalog below it.
function renderModels(status) {
  const active = [], idle = [];
  for (const m of state.models) {
    const live = status.models[m.name] || {};
    const current = live.state || m.state;
    const modes = SCORE.modes(m);
    const tasks = [...encodeTypes(m), ...(modes.length ? [`score (${modes.join(", ")})`] : [])];
    const dims = Object.entries(m.dims || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    const cells = [
      h("th", { scope: "row", text: m.name }),
      h("td", { "data-label": "State", text: current, class: `state ${current}`, title: m.error || undefined }),
      h("td", { "data-label": "Family", text: m.family }),
      h("td", { "data-label": "Tasks", text: tasks.join(", ") || "—" }),
      h("td", { "data-label": "Dims", text: dims || "—" }),
    ];
    if (current === "available") {
      idle.push(h("tr", { "data-model": m.name }, ...cells));
      continue;
    }
    const perSecond = (key) => {
      const r = rate(m.name, key);
      return r === null ? "—" : r.toFixed(r < 10 ? 1 : 0);
    };
    const count = (key, label) => h("td", { class: "num", "data-key": key, "data-label": label, text: String(live[key] ?? 0) });
    active.push(h("tr", { "data-model": m.name }, ...cells,
      h("td", { class: "num", "data-label": "Memory", text: live.memory_bytes ? bytes(live.memory_bytes) : "—" }),
      count("queued_tokens", "Queued tokens"), count("requests", "Requests"), count("items", "Items"),
      h("td", { class: "num", "data-label": "Items/s", text: perSecond("items") }),
      h("td", { class: "num", "data-label": "Tokens/s", text: perSecond("tokens") })));
  }
  $("models-body").replaceChildren(...active);
  $("catalog-body").replaceChildren(...idle);
  $("catalog-count").textContent = String(idle.length);
  $("catalog").hidden = !idle.length;
}

function renderErrors(status) {
  const box = $("errors");
  if (!status.errors.length) {
    box.replaceChildren(h("p", { class: "note", text: "No error responses since the server started." }));
    return;
  }
  const rows = status.errors.map((e) => h("tr", { "data-code": e.code },
    h("th", { scope: "row", text: e.code }),
    h("td", { class: "num", "data-label": "Count", text: String(e.count) }),
    h("td", { class: "num", "data-label": "HTTP", text: String(e.status) }),
    h("td", { "data-label": "Last", text: `${duration(Math.max(0, status.time - e.last_at))} ago` }),
    h("td", { "data-label": "Route · model", text: [e.route, e.model].filter(Boolean).join(" · ") }),
    h("td", { class: "message", "data-label": "Message", text: e.message })));
  box.replaceChildren(h("div", { class: "scroll" }, h("table", { class: "stack" },
    h("caption", { text: "Latest error response of each code" }),
    h("thead", {}, h("tr", {}, ...["Code", "Count", "HTTP", "Last", "Route · model", "Message"]
      .map((t) => h("th", { scope: "col", text: t })))),
    h("tbody", {}, ...rows))));
}

// ------------------------------------------------------------------ playground

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function setOutputChoices() {
  const model = currentModel();
  const types = model ? encodeTypes(model) : [];
  for (const box of document.querySelectorAll("#outputs input[type=checkbox]")) {
    const served = types.includes(box.value);
    box.disabled = !served;
    box.checked = served;
  }
}

async function run(event) {
  event.preventDefault();
  clearError();
  const model = currentModel();
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  const query = $("query").value.trim();
  const types = [...document.querySelectorAll("#outputs input:checked")].map((b) => b.value);
  for (const id of ["dense-result", "sparse-result", "multivector-result", "score-result"]) $(id).hidden = true;
  if (!model) return showError(new Error("No model to encode with."));
  if (!texts.length) return showError(new Error("Enter at least one text (one per line)."));
  if (texts.length > MAX_TEXTS) return showError(new Error(`Enter at most ${MAX_TEXTS} texts.`));
  if (!types.length) return showError(new Error("Choose at least one output type."));
  const button = $("run");
  button.disabled = true;
  $("results").setAttribute("aria-busy", "true");
  try {
    await runPlayground(model, texts, query, types);
  } catch (err) {
    if (err.status === 401) askForKey(err);
    else showError(err);
  } finally {
    button.disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

async function runPlayground(model, texts, query, types) {
  const path = modelPath(model.name);
  const items = texts.map((text, i) => ({ id: String(i), text }));
  const encoded = await api(`/v1/encode/${path}`, { items, params: { output_types: types } });
  const wantAlign = types.includes("multivector") && query;
  const topIds = types.includes("sparse") ? encoded.items.map((it) => topTerms(it.sparse)) : [];
  const modes = query ? SCORE.modes(model) : [];
  const asked = [...new Set(topIds.flat().map((t) => t.id))];
  const [textTokens, queryEncoded, queryTokens, ...scores] = await Promise.all([
    asked.length || wantAlign
      ? api(`/v1/tokens/${path}`, { items: wantAlign ? items.map(({ text }) => ({ text })) : undefined, ids: asked })
      : null,
    wantAlign ? api(`/v1/encode/${path}`, {
      items: [{ text: query }], params: { output_types: ["multivector"], options: { is_query: true } },
    }) : null,
    wantAlign ? api(`/v1/tokens/${path}`, { items: [{ text: query }], options: { is_query: true } }) : null,
    ...modes.map((mode) => api(`/v1/score/${path}`, {
      query: { text: query }, items, options: { [SCORE.option]: mode },
    })),
  ]);
  if (types.includes("dense")) renderDense(texts, encoded.items.map((it) => it.dense.values));
  if (topIds.length) renderSparse(texts, topIds, textTokens ? textTokens.ids : []);
  const multivectorScores = {};
  modes.forEach((mode, k) => {
    for (const s of scores[k].scores) {
      if (s.components && s.components.multivector !== undefined) multivectorScores[s.item_id] = s.components.multivector;
    }
  });
  if (types.includes("multivector")) {
    renderAlignmentChoice(texts, query, encoded.items, queryEncoded, textTokens, queryTokens, multivectorScores);
  }
  if (modes.length) renderScores(texts, modes, scores);
  else if (query) renderNoScores(model);
}

// ------------------------------------------------------------------ heatmaps

// Light to dark blue; t in [0, 1].
const STOPS = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
  return `rgb(${c.join(",")})`;
}

// An SVG heatmap: values[r][c]; cells carry data-row, data-col and data-value (full
// precision) and a <title>; `marks` (optional) holds per row the column to outline.
function heatmap({ rowLabels, colLabels, values, cell, showValues, caption, describe, marks }) {
  const flat = values.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const longest = (labels) => Math.max(1, ...labels.map((l) => l.length));
  const left = Math.min(160, 12 + 7 * longest(rowLabels));
  const rotate = colLabels.some((l) => l.length > 3);
  const top = rotate ? Math.min(150, 16 + 6.5 * longest(colLabels)) : 22;
  const width = left + cell * colLabels.length + 4, height = top + cell * rowLabels.length + 4;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "heatmap",
    "aria-label": caption,
  });
  const title = svg("title");
  title.textContent = caption;
  root.append(title);
  colLabels.forEach((label, c) => {
    const x = left + c * cell + cell / 2;
    const t = svg("text", rotate
      ? { x, y: top - 4, class: "col-label", transform: `rotate(-60 ${x} ${top - 4})` }
      : { x, y: top - 6, class: "col-label", "text-anchor": "middle" });
    t.textContent = label;
    root.append(t);
  });
  rowLabels.forEach((label, r) => {
    const t = svg("text", { x: left - 6, y: top + r * cell + cell / 2 + 4, class: "row-label", "text-anchor": "end" });
    t.textContent = label;
    root.append(t);
    values[r].forEach((v, c) => {
      const shade = hi > lo ? (v - lo) / (hi - lo) : 1;
      const rect = svg("rect", {
        x: left + c * cell, y: top + r * cell, width: cell - 1, height: cell - 1, fill: colour(shade),
        class: marks && marks[r] === c ? "cell best" : "cell",
        "data-row": r, "data-col": c, "data-value": String(v),
      });
      const tip = svg("title");
      tip.textContent = describe(r, c, v);
      rect.append(tip);
      root.append(rect);
      if (showValues) {
        const t = svg("text", {
          x: left + c * cell + cell / 2, y: top + r * cell + cell / 2 + 4, "text-anchor": "middle",
          class: shade > 0.55 ? "value light" : "value",
        });
        t.textContent = v.toFixed(2);
        root.append(t);
      }
    });
  });
  return { root, lo, hi };
}

function legend(lo, hi, what) {
  return h("p", { class: "note", text: `Colour: ${what}, from ${lo.toFixed(3)} (light) to ${hi.toFixed(3)} (dark).` });
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

function renderDense(texts, vectors) {
  const values = vectors.map((a) => vectors.map((b) => cosine(a, b)));
  const labels = texts.map((_, i) => String(i + 1));
  const { root, lo, hi } = heatmap({
    rowLabels: labels, colLabels: labels, values, cell: 46, showValues: true,
    caption: `Cosine similarity of the dense vectors of ${texts.length} texts`,
    describe: (r, c, v) => `text ${r + 1} vs text ${c + 1}: cosine ${v.toFixed(4)}`,
  });
  $("dense-heatmap").replaceChildren(root, legend(lo, hi, "cosine similarity"), textList(texts));
  $("dense-result").hidden = false;
}

function textList(texts) {
  return h("ol", { class: "texts" }, ...texts.map((t) => h("li", { text: snippet(t, 120) })));
}

// ------------------------------------------------------------------ sparse

// The item's TOP_TERMS heaviest token ids, heaviest first (ties: lower id first).
function topTerms(sparse) {
  const terms = sparse.indices.map((id, k) => ({ id, weight: sparse.values[k] }));
  terms.sort((a, b) => b.weight - a.weight || a.id - b.id);
  return terms.slice(0, TOP_TERMS);
}

function renderSparse(texts, tops, decoded) {
  const byId = new Map(decoded.map((d) => [d.id, d]));
  const cards = texts.map((text, i) => {
    const top = tops[i];
    const max = top.length ? top[0].weight : 1;
    const list = h("ol", { class: "terms" }, ...top.map(({ id, weight }) => {
      const d = byId.get(id);
      const fill = h("span", { class: "fill" });
      fill.style.width = `${max > 0 ? (100 * weight) / max : 0}%`;
      return h("li", { "data-id": id, "data-weight": String(weight) },
        h("span", { class: "term", title: `token ${JSON.stringify(d.token)}, id ${id}`, text: d.text.trim() || d.token }),
        h("span", { class: "bar", "aria-hidden": "true" }, fill),
        h("span", { class: "weight", text: weight.toFixed(3) }));
    }));
    return h("article", { class: "card", "data-item": i },
      h("h4", { text: `Text ${i + 1}` }), h("p", { class: "snippet", text: snippet(text) }),
      top.length ? list : h("p", { class: "note", text: "No term has a weight above 0." }));
  });
  $("sparse-terms").replaceChildren(...cards);
  $("sparse-result").hidden = false;
}

// ------------------------------------------------------------------ multivector

function renderAlignmentChoice(texts, query, items, queryEncoded, textTokens, queryTokens, scoreOf) {
  const box = $("alignment");
  if (!query) {
    box.replaceChildren(h("p", { class: "note", text: "Enter a query to see how its tokens align with a text's tokens." }));
    $("align-choice").hidden = true;
    $("multivector-result").hidden = false;
    return;
  }
  const select = $("align-text");
  select.replaceChildren(...texts.map((t, i) => h("option", { value: i, text: `${i + 1}. ${snippet(t, 40)}` })));
  const draw = () => {
    const i = Number(select.value);
    const q = queryEncoded.items[0].multivector, d = items[i].multivector;
    renderAlignment(i, q.values, tail(queryTokens.items[0].tokens, q), d.values,
      tail(textTokens.items[i].tokens, d), scoreOf[String(i)]);
  };
  select.onchange = draw;
  $("align-choice").hidden = false;
  draw();
  $("multivector-result").hidden = false;
}

// The tokens that have a vector: the last num_tokens of the text's tokens (BGE-M3 drops <s>).
function tail(tokens, multivector) {
  if (tokens.length < multivector.num_tokens) throw new Error("the server's tokens do not cover the multivector rows");
  return tokens.slice(tokens.length - multivector.num_tokens);
}

function renderAlignment(index, qRows, qTokens, dRows, dTokens, serverScore) {
  if (qRows.length * dRows.length > MAX_ALIGN_CELLS) {
    $("alignment").replaceChildren(h("p", { class: "note", text: `${qRows.length} query tokens by ${dRows.length} text tokens are too many cells to draw; try shorter texts.` }));
    return;
  }
  const values = qRows.map((q) => dRows.map((d) => {
    let dot = 0;
    for (let k = 0; k < q.length; k++) dot += q[k] * d[k];
    return dot;
  }));
  const best = values.map((row) => row.indexOf(Math.max(...row)));
  const maxsim = values.reduce((sum, row, r) => sum + row[best[r]], 0) / values.length;
  const { root, lo, hi } = heatmap({
    rowLabels: qTokens, colLabels: dTokens, values, cell: 22, showValues: false, marks: best,
    caption: `MaxSim alignment of the query's ${qTokens.length} tokens with text ${index + 1}'s ${dTokens.length} tokens`,
    describe: (r, c, v) => `${qTokens[r]} · ${dTokens[c]}: ${v.toFixed(4)}`,
  });
  const summary = h("p", { class: "maxsim", "data-maxsim": String(maxsim) },
    h("strong", { text: `MaxSim ${maxsim.toFixed(4)}` }),
    " (the mean over query tokens of each one's best match, outlined)",
    serverScore === undefined ? null : `; /v1/score's multivector score: ${serverScore.toFixed(4)}`);
  const matches = h("ol", { class: "matches" }, ...qTokens.map((t, r) => h("li", {
    text: `${t} → ${dTokens[best[r]]} (${values[r][best[r]].toFixed(3)})`,
  })));
  const details = h("details", {}, h("summary", { text: "Best match of each query token" }), matches);
  $("alignment").replaceChildren(summary, h("div", { class: "scroll" }, root), legend(lo, hi, "dot product of the token vectors"), details);
}

// ------------------------------------------------------------------ scores

function renderScores(texts, modes, results) {
  const ranks = results.map((r) => new Map(r.scores.map((s) => [s.item_id, s])));
  const rows = texts.map((text, i) => h("tr", {},
    h("th", { scope: "row", text: `${i + 1}. ${snippet(text, 48)}` }),
    ...modes.map((mode, k) => {
      const s = ranks[k].get(String(i));
      return h("td", {
        class: s.rank === 0 ? "num top" : "num", "data-mode": mode, "data-item": i,
        "data-rank": s.rank, "data-score": String(s.score), text: `#${s.rank + 1} · ${s.score.toFixed(4)}`,
      });
    })));
  $("scores").replaceChildren(h("div", { class: "scroll" }, h("table", {},
    h("caption", { text: "Rank (1 = best) and score of each text against the query, per score mode" }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Text" }),
      ...modes.map((m) => h("th", { scope: "col", text: m })))),
    h("tbody", {}, ...rows))));
  $("score-result").hidden = false;
}

function renderNoScores(model) {
  $("scores").replaceChildren(h("p", { class: "note", text: `${model.name} (${model.family}) does not score: /v1/score needs a model with score types.` }));
  $("score-result").hidden = false;
}

// ------------------------------------------------------------------ start

async function start() {
  $("texts").value = SAMPLE_TEXTS.join("\n");
  $("query").value = SAMPLE_QUERY;
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("play-form").addEventListener("submit", run);
  $("model").addEventListener("change", setOutputChoices);
  try {
    const health = await api("/health");
    $("version").textContent = `version ${health.version} · SIE protocol ${health.sie_protocol}`;
  } catch (err) {
    showError(err);
  }
  await connect();
}

document.addEventListener("DOMContentLoaded", start);
