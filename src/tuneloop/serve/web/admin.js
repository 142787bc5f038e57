// The admin page: versions and metrics, the review queue, the latest feedback, and retrain → gate → promote.
"use strict";

const keyInput = document.getElementById("key");
keyInput.value = sessionStorage.getItem("tuneloop-admin-key") || "";
let polling = null;

async function call(path, body) {
  const init = { headers: { "content-type": "application/json", "x-api-key": keyInput.value } };
  if (body !== undefined) { init.method = "POST"; init.body = JSON.stringify(body); }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = content ?? "";
  row.append(td);
  return td;
}

function table(columns) {
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  for (const c of columns) { const th = document.createElement("th"); th.textContent = c; head.append(th); }
  return t;
}

function button(label, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.onclick = async () => {
    b.disabled = true;
    try { await action(); } catch (error) { show(error.message); } finally { b.disabled = false; }
  };
  return b;
}

function show(message) { document.getElementById("status").textContent = message || ""; }
const percent = (value) => (typeof value === "number" ? (value * 100).toFixed(1) + "%" : "");

async function loadModels() {
  const { models } = await call("/v1/admin/models");
  await Promise.all([loadReview(models.map((m) => m.name)), loadSuggestions(models.map((m) => m.name))]);
  const root = document.getElementById("models");
  root.replaceChildren();
  for (const model of models) {
    const title = document.createElement("h3");
    title.textContent = `${model.name} (serving v${model.serving ?? "–"}) `;
    title.append(button("retrain", () => startJob("retrain", model.name)));
    const t = table(["version", "stage", "accuracy", "macro-F1", "parent", "created", ""]);
    const body = t.createTBody();
    for (const v of [...model.versions].reverse()) {
      const row = body.insertRow();
      cell(row, `v${v.version}`);
      cell(row, v.stage).className = `stage-${v.stage}`;
      cell(row, percent(v.metrics.accuracy));
      cell(row, percent(v.metrics.macro_f1));
      cell(row, v.parent);
      cell(row, v.created_at.slice(0, 16).replace("T", " "));
      const actions = cell(row, "");
      if (v.stage === "candidate") {
        actions.append(button("gate", () => startJob("gate", `${model.name}@${v.version}`)), " ");
      }
      if (v.stage !== "production") {
        actions.append(button("promote", async () => {
          await call(`/v1/models/${encodeURIComponent(model.name)}/promote`, { version: v.version, wait: true });
          await loadModels();
        }));
      }
    }
    root.append(title, t);
  }
}

// The text with each word's background shaded by what it added to the label (green) or took away (red); the
// page's policy allows no inline style attributes, so the colours are set through the DOM.
function shaded(explanation) {
  const out = document.createElement("span");
  out.className = "explained";
  const strongest = Math.max(...explanation.words.map((w) => Math.abs(w.score)), 0) || 1;
  let cursor = 0;
  for (const word of explanation.words) {
    out.append(explanation.text.slice(cursor, word.start));
    const span = document.createElement("span");
    span.textContent = explanation.text.slice(word.start, word.end);
    const alpha = (0.8 * Math.min(Math.abs(word.score) / strongest, 1)).toFixed(2);
    span.style.backgroundColor = word.score >= 0 ? `rgba(26,127,55,${alpha})` : `rgba(207,34,46,${alpha})`;
    span.title = `${word.score >= 0 ? "+" : ""}${word.score.toFixed(3)}`;
    out.append(span);
    cursor = word.end;
  }
  out.append(explanation.text.slice(cursor));
  return out;
}

async function loadFeedback() {
  const { items } = await call("/v1/admin/feedback?limit=50");
  const t = table(["when", "model", "text", "predicted", "corrected", "rating", "comment", "sender", "review"]);
  const body = t.createTBody();
  for (const f of items) {
    const row = body.insertRow();
    const values = [f.at.slice(0, 19).replace("T", " "), f.model, f.text, f.predicted, f.corrected_label,
                    f.rating === null ? "" : (f.rating > 0 ? "👍" : f.rating < 0 ? "👎" : "0"), f.comment,
                    f.sender, f.trusted ? "trusted" : f.review];
    const cells = values.map((value) => cell(row, value));
    // Why the version that answered chose its label, word by word (Integrated Gradients on the server).
    cells[3].append(" ", button("why", async () => {
      const explanation = await call("/v1/admin/explain", { model: f.model, text: f.text, label: f.predicted });
      cells[2].replaceChildren(shaded(explanation));
    }));
  }
  document.getElementById("feedback").replaceChildren(items.length ? t : "No feedback yet.");
}

// One table per model: feedback waiting for a decision, grouped by text and proposed label; decide per group
// or on every checked group at once.
async function loadReview(names) {
  const root = document.getElementById("review");
  const parts = [];
  for (const name of names) {
    const { groups } = await call(`/v1/admin/review?model=${encodeURIComponent(name)}&limit=200`);
    if (!groups.length) continue;
    const decide = async (decision, chosen) => {
      if (!chosen.length) return;
      const { decided } = await call("/v1/admin/review", { model: name, decision, groups: chosen });
      show(`${decision}d ${decided} feedback rows on ${name}`);
      await loadReview(names);
    };
    const t = table(["", "text", "label (model said)", "pending", "senders", "flags", ""]);
    t.className = "review";
    const body = t.createTBody();
    for (const g of groups) {
      const row = body.insertRow();
      row.dataset.group = g.group;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = g.group;
      cell(row, box);
      cell(row, g.text);
      cell(row, `${g.label} (${g.predicted})`);
      cell(row, String(g.pending));
      cell(row, Object.entries(g.senders).map(([s, n]) => `${s} ×${n}`).join(", "));
      cell(row, g.flags.join("; ")).className = g.flags.length ? "flag" : "";
      const actions = cell(row, "");
      actions.append(button("approve", () => decide("approve", [g.group])), " ",
                     button("reject", () => decide("reject", [g.group])));
    }
    const checked = () => [...t.querySelectorAll("input:checked")].map((box) => box.value);
    const title = document.createElement("h3");
    title.textContent = `${name} `;
    title.append(button("approve checked", () => decide("approve", checked())), " ",
                 button("reject checked", () => decide("reject", checked())));
    parts.push(title, t);
  }
  root.replaceChildren(...(parts.length ? parts : ["Nothing waits for review."]));
}

// To label: one message at a time per model in production, most worth a label first. The model's guess is shown
// but nothing is chosen for the person (its guess would anchor the answer); typing filters the labels, and the
// label chosen goes to the message and to the similar messages left ticked, in one POST /v1/admin/labels.
const labellers = new Map();  // model name → its labeller, kept across reloads so that nobody loses their place

async function loadSuggestions(names) {
  const parts = [];
  for (const name of names) {
    const kept = labellers.get(name);
    if (kept && !kept.finished()) { parts.push(kept.root); continue; }
    let answer;
    try {
      answer = await call(`/v1/admin/suggestions?model=${encodeURIComponent(name)}&budget=20`);
    } catch (error) { continue; }  // no production version, or nothing served yet
    if (!answer.suggestions.length) continue;
    const labeller = new Labeller(name, answer, () => { labellers.delete(name); return loadSuggestions(names); });
    labellers.set(name, labeller);
    parts.push(labeller.root);
  }
  // Reloads (a key entered, a job finished) keep the focus where it was; the first list takes it from the key box.
  const focused = document.activeElement;
  document.getElementById("suggestions").replaceChildren(...(parts.length ? parts : ["Nothing to label yet."]));
  if (focused.isConnected && focused !== document.body && focused !== keyInput) focused.focus();
  else if (parts.length) parts[0].querySelector("input.label-filter").focus();
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nextRetrainText(coming) {
  const labels = Object.keys(coming.labels).length;
  const waiting = coming.awaiting_review > 0 ? `, ${coming.awaiting_review} awaiting review` : "";
  return `the next retrain learns ${coming.examples} examples of ${labels} labels${waiting}`;
}

class Labeller {
  constructor(model, answer, reload) {
    this.model = model;
    this.items = answer.suggestions;
    this.outcome = this.items.map(() => null);  // "labelled as …" or "skipped", per message
    this.choices = [...answer.labels.map((label) => ({ label, text: label })),
                    { label: answer.out_of_scope_label, text: "out of scope" }];
    this.index = 0;
    this.active = -1;  // the chosen label in the filtered list: none until the person chooses
    this.saving = false;
    this.build(reload);
    this.render();
  }

  build(reload) {
    const id = `label-${this.model}`;
    this.root = element("div", "labeller");
    this.root.dataset.model = this.model;
    this.progress = element("p", "progress");
    this.progress.setAttribute("aria-live", "polite");
    this.message = element("blockquote", "message");
    this.guess = element("p", "guess");
    this.filter = element("input", "label-filter");
    Object.assign(this.filter, { id: `${id}-filter`, type: "text", autocomplete: "off", spellcheck: false });
    this.filter.setAttribute("role", "combobox");
    this.filter.setAttribute("aria-expanded", "true");
    this.filter.setAttribute("aria-controls", `${id}-choices`);
    const filterLabel = element("label", "", "Label (type to filter) ");
    filterLabel.htmlFor = this.filter.id;
    this.list = element("ul", "choices");
    this.list.id = `${id}-choices`;
    this.list.setAttribute("role", "listbox");
    this.list.setAttribute("aria-label", `labels of ${this.model}`);
    this.similar = element("fieldset", "similar");
    const actions = element("p", "labeller-actions");
    actions.append(button("← previous", () => this.move(-1)), " ", button("skip (Shift+S)", () => this.skip()), " ",
                   button("save (Enter)", () => this.save()), " ", button("next →", () => this.move(1)), " ",
                   button("load more", reload));
    this.coming = element("p", "next-retrain");
    this.coming.setAttribute("aria-live", "polite");
    this.filter.addEventListener("input", () => { this.active = this.filter.value ? 0 : -1; this.drawChoices(); });
    this.filter.addEventListener("keydown", (event) => this.key(event));
    this.similar.addEventListener("keydown", (event) => {  // Tab to a similar message, Space to untick, Enter saves
      if (event.key === "Enter") { event.preventDefault(); this.guarded(() => this.save()); }
    });
    this.root.append(element("h3", "", this.model), this.progress, this.message, this.guess, filterLabel,
                     this.filter, this.list, this.similar, actions, this.coming);
  }

  finished() { return this.outcome.every((o) => o !== null); }

  filtered() {
    const typed = this.filter.value.trim().toLowerCase();
    return this.choices.filter((c) => c.text.toLowerCase().includes(typed) || c.label.toLowerCase().includes(typed));
  }

  key(event) {
    if (event.isComposing) return;  // Enter or an arrow that ends a Chinese input method's word is not ours
    const empty = this.filter.value === "";
    const shown = this.filtered();
    const moves = { ArrowDown: 1, ArrowUp: -1 };
    if (event.key in moves) {
      this.active = Math.max(0, Math.min(shown.length - 1, this.active + moves[event.key]));
      this.drawChoices();
    } else if (event.key === "Enter") {
      this.guarded(() => this.save());
    } else if (event.key === "Escape") {
      this.filter.value = "";
      this.active = -1;
      this.drawChoices();
    } else if (empty && event.key === "S") {
      this.skip();
    } else if (empty && (event.key === "ArrowLeft" || event.key === "ArrowRight")) {
      this.move(event.key === "ArrowLeft" ? -1 : 1);
    } else return;
    event.preventDefault();
  }

  async guarded(action) {
    try { await action(); } catch (error) { show(error.message); }
  }

  render() {
    const item = this.items[this.index];
    const done = this.outcome.filter((o) => o !== null).length;
    this.progress.textContent = `${this.index + 1} of ${this.items.length}` +
      (done ? ` (${done} done${this.outcome[this.index] ? `; this one ${this.outcome[this.index]}` : ""})` : "");
    this.message.textContent = item.text;
    this.guess.textContent = `The model's guess: ${item.predicted} (${percent(item.confidence)}); ${item.why}`;
    this.filter.value = "";
    this.active = -1;
    this.drawChoices();
    this.drawSimilar(item);
  }

  drawChoices() {
    const shown = this.filtered();
    this.list.replaceChildren();
    shown.forEach((choice, i) => {
      const option = element("li", i === this.active ? "chosen" : "", choice.text);
      option.id = `${this.list.id}-${i}`;
      option.setAttribute("role", "option");
      option.setAttribute("aria-selected", String(i === this.active));
      option.addEventListener("click", () => { this.active = i; this.drawChoices(); this.filter.focus(); });
      this.list.append(option);
    });
    const chosen = this.active >= 0 && shown.length ? `${this.list.id}-${this.active}` : null;
    if (chosen) this.filter.setAttribute("aria-activedescendant", chosen);
    else this.filter.removeAttribute("aria-activedescendant");
    if (!shown.length) this.list.append(element("li", "none", "no label matches"));
  }

  drawSimilar(item) {
    const legend = element("legend", "", item.similar.length
      ? `Similar messages: ticked ones get the same label (${item.similar.length})` : "No similar messages");
    this.similar.replaceChildren(legend);
    for (const near of item.similar) {
      const box = element("input");
      Object.assign(box, { type: "checkbox", checked: true, value: near.prediction_id });
      const row = element("label", "similar-message");
      row.append(box, ` ${near.text} `, element("span", "hint",
        `(model said ${near.predicted}; similarity ${near.similarity.toFixed(2)})`));
      this.similar.append(row);
    }
  }

  move(step) {
    this.index = (this.index + step + this.items.length) % this.items.length;
    this.render();
    this.filter.focus();
  }

  // The next message nobody has labelled or skipped, after this one or else from the start; the list's end says so.
  advance() {
    const open = (i) => this.outcome[i] === null;
    const after = this.items.findIndex((_, i) => i > this.index && open(i));
    const next = after >= 0 ? after : this.items.findIndex((_, i) => open(i));
    if (next >= 0) this.index = next;
    this.render();
    if (next < 0) this.progress.textContent = `All ${this.items.length} done: "load more" asks for the next ones`;
    this.filter.focus();
  }

  skip() {
    this.outcome[this.index] = "skipped";
    this.advance();
  }

  async save() {
    const choice = this.filtered()[this.active];
    const item = this.items[this.index];
    if (!choice) throw new Error(`choose a label for "${item.text.slice(0, 40)}" first (type to filter, ↑/↓, Enter)`);
    if (this.saving) return;  // Enter held down: one request per message
    this.saving = true;
    try { await this.send(item, choice); } finally { this.saving = false; }
  }

  async send(item, choice) {
    const ticked = [...this.similar.querySelectorAll("input:checked")].map((box) => box.value);
    const labels = Object.fromEntries([item.prediction_id, ...ticked].map((id) => [id, choice.label]));
    const answer = await call("/v1/admin/labels", { model: this.model, labels });
    const also = ticked.length ? ` and ${ticked.length} similar` : "";
    show(`labelled "${item.text.slice(0, 40)}"${also} as ${choice.text}`);
    this.coming.textContent = nextRetrainText(answer.next_retrain);
    this.outcome[this.items.indexOf(item)] = `labelled as ${choice.text}`;  // the person may have moved on
    this.advance();
  }
}

// --- where the assistant says no: the curve of in-scope messages turned away against out-of-scope ones caught,
// the point it answers at, and a slider to move it with what the move is expected to do.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (parent) parent.append(node);
  return node;
}

// A share's 95% interval (Wilson), as the server gives it for the policy's point.
function wilson(value, messages) {
  if (!messages) return { value, low: 0, high: 1, messages };
  const z = 1.96, n = messages, denominator = 1 + z * z / n;
  const centre = (value + z * z / (2 * n)) / denominator;
  const half = z * Math.sqrt(value * (1 - value) / n + z * z / (4 * n * n)) / denominator;
  return { value, low: Math.max(0, centre - half), high: Math.min(1, centre + half), messages };
}

const shareText = (share) => `${percent(share.value)} [${percent(share.low)}–${percent(share.high)}]`;

function scopePlot(scope, chosen) {
  const now = scope.curve.find((p) => p.threshold === scope.threshold) || scope.curve[0];
  // The left half of the curve is where operating points live; the whole of it when a point lies further.
  const widest = Math.max(now.in_scope_rejected, chosen.in_scope_rejected) > 0.5 ? 1 : 0.5;
  const width = 560, height = 300, left = 48, bottom = 40, top = 24, right = 16;
  const x = (rejected) => left + Math.min(rejected, widest) / widest * (width - left - right);
  const y = (caught) => height - bottom - caught * (height - bottom - top);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "scope-plot", role: "img",
                            "aria-label": "in-scope messages turned away against out-of-scope messages caught" });
  for (const tick of [0, 0.2, 0.4, 0.6, 0.8, 1].map((t) => t * widest)) {
    svg("line", { x1: x(tick), x2: x(tick), y1: y(0), y2: y(1), class: "grid" }, plot);
    svg("text", { x: x(tick), y: height - bottom + 16, class: "tick", "text-anchor": "middle" }, plot)
      .textContent = `${Math.round(tick * 100)}%`;
  }
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    svg("line", { x1: x(0), x2: x(widest), y1: y(tick), y2: y(tick), class: "grid" }, plot);
    svg("text", { x: left - 6, y: y(tick) + 4, class: "tick", "text-anchor": "end" }, plot).textContent = `${tick * 100}%`;
  }
  svg("text", { x: (left + width) / 2, y: height - 4, class: "axis", "text-anchor": "middle" }, plot)
    .textContent = "in-scope messages turned away";
  svg("text", { x: 4, y: 12, class: "axis" }, plot).textContent = "out-of-scope caught";
  svg("line", { x1: x(scope.max_in_scope_rejected), x2: x(scope.max_in_scope_rejected), y1: y(0), y2: y(1),
                class: "limit" }, plot);
  svg("line", { x1: x(0), x2: x(widest), y1: y(scope.min_out_of_scope_caught), y2: y(scope.min_out_of_scope_caught),
                class: "limit" }, plot);
  const shown = scope.curve.filter((p) => p.in_scope_rejected <= widest);
  svg("polyline", { points: shown.map((p) => `${x(p.in_scope_rejected)},${y(p.out_of_scope_caught)}`).join(" "),
                    class: "curve" }, plot);
  svg("circle", { cx: x(now.in_scope_rejected), cy: y(now.out_of_scope_caught), r: 6, class: "now" }, plot);
  svg("circle", { cx: x(chosen.in_scope_rejected), cy: y(chosen.out_of_scope_caught), r: 5, class: "chosen" }, plot);
  return plot;
}

function consequence(scope, point) {
  const rejected = wilson(point.in_scope_rejected, scope.in_scope_examples);
  const caught = wilson(point.out_of_scope_caught, scope.out_of_scope_examples);
  return `at threshold ${point.threshold.toFixed(4)} it would turn away ${shareText(rejected)} of in-scope messages ` +
    `and catch ${scope.out_of_scope_examples ? shareText(caught) : "an unknown share"} of out-of-scope ones`;
}

async function loadScope() {
  const root = document.getElementById("scope");
  let scope;
  try { scope = await call("/v1/admin/scope"); } catch (error) { root.replaceChildren(error.message); return; }
  const nowIndex = Math.max(0, scope.curve.findIndex((p) => p.threshold === scope.threshold));
  const summary = document.createElement("p");
  summary.className = "scope-summary";
  summary.textContent = `${scope.intent_model} turns away ${shareText(scope.in_scope_rejected)} of in-scope messages ` +
    `and catches ${shareText(scope.out_of_scope_caught)} of out-of-scope ones like its ${scope.out_of_scope_examples} ` +
    `examples (threshold ${scope.threshold.toFixed(4)}, ${scope.policy}).`;
  const notes = document.createElement("ul");
  for (const note of scope.notes) { const li = document.createElement("li"); li.textContent = note; notes.append(li); }
  notes.className = "scope-notes";
  const slider = document.createElement("input");
  Object.assign(slider, { type: "range", min: 0, max: scope.curve.length - 1, step: 1, value: nowIndex });
  slider.className = "scope-slider";
  slider.setAttribute("aria-label", "move the point along the curve");
  const predicted = document.createElement("p");
  predicted.className = "scope-consequence";
  const holder = document.createElement("div");
  const draw = () => {
    const point = scope.curve[Number(slider.value)];
    holder.replaceChildren(scopePlot(scope, point));
    predicted.textContent = consequence(scope, point);
  };
  slider.addEventListener("input", draw);
  draw();
  const actions = document.createElement("p");
  actions.append(
    button("use this point", async () => {
      const point = scope.curve[Number(slider.value)];
      await call("/v1/admin/scope", { threshold: point.threshold });
      show(`the assistant now answers at threshold ${point.threshold.toFixed(4)}`);
      await loadScope();
    }), " ",
    button("back to the policy's point", async () => {
      await call("/v1/admin/scope", { threshold: null });
      show("the assistant answers at the policy's point again");
      await loadScope();
    }));
  const moves = document.createElement("ul");
  moves.className = "scope-moves";
  for (const move of scope.moves) {
    const li = document.createElement("li");
    li.textContent = `${move.at.slice(0, 19).replace("T", " ")}: ${move.by} moved it to ` +
      (move.threshold === null ? "the policy's point" : `threshold ${move.threshold.toFixed(4)}`);
    moves.append(li);
  }
  root.replaceChildren(summary, notes, holder, slider, predicted, actions, moves);
}

async function loadJobs() {
  const { jobs } = await call("/v1/admin/jobs");
  const root = document.getElementById("jobs");
  root.replaceChildren();
  for (const job of jobs.slice(0, 5)) {
    const detail = await call(`/v1/admin/jobs/${job.id}`);
    const title = document.createElement("h4");
    title.textContent = `${job.kind} ${job.target}: ${job.status}`;
    const log = document.createElement("pre");
    log.className = "log";
    log.textContent = detail.log;
    root.append(title, log);
  }
  const running = jobs.some((j) => j.status === "running");
  if (running && !polling) polling = setInterval(refresh, 2000);
  if (!running && polling) { clearInterval(polling); polling = null; await loadModels(); }
}

async function startJob(kind, target) {
  await call("/v1/admin/jobs", { kind, target });
  await loadJobs();
}

async function refresh() {
  if (!keyInput.value) return;
  sessionStorage.setItem("tuneloop-admin-key", keyInput.value);
  try {
    show("");
    await Promise.all([loadModels(), loadFeedback(), loadJobs(), loadScope()]);
  } catch (error) { show(error.message); }
}

keyInput.addEventListener("change", refresh);
refresh();
