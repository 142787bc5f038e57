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

// One table per model in production: the predictions most worth a label; choose the right one and save.
async function loadSuggestions(names) {
  const parts = [];
  for (const name of names) {
    let answer;
    try {
      answer = await call(`/v1/admin/suggestions?model=${encodeURIComponent(name)}&budget=20`);
    } catch (error) { continue; }  // no production version, or nothing served yet
    if (!answer.suggestions.length) continue;
    const t = table(["text", "model said", "why", "right label", ""]);
    t.className = "suggestions";
    const body = t.createTBody();
    for (const s of answer.suggestions) {
      const row = body.insertRow();
      row.dataset.prediction = s.prediction_id;
      cell(row, s.text);
      cell(row, `${s.predicted} (${percent(s.confidence)})`);
      cell(row, s.why);
      const choice = document.createElement("select");
      for (const label of answer.labels) choice.add(new Option(label, label, false, label === s.predicted));
      cell(row, choice);
      cell(row, button("save", async () => {
        await call("/v1/admin/labels", { model: name, labels: { [s.prediction_id]: choice.value } });
        show(`labelled "${s.text.slice(0, 40)}" as ${choice.value}`);
        row.remove();
      }));
    }
    const title = document.createElement("h3");
    title.textContent = name;
    parts.push(title, t);
  }
  document.getElementById("suggestions").replaceChildren(...(parts.length ? parts : ["Nothing to label yet."]));
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
    await Promise.all([loadModels(), loadFeedback(), loadJobs()]);
  } catch (error) { show(error.message); }
}

keyInput.addEventListener("change", refresh);
refresh();
