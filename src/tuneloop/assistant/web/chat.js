// The chat page: one POST /v1/chat per message; thumbs and "wrong intent?" (an intent, or out of scope) go to
// /v1/feedback.
"use strict";

// The server issues the session on the first message; this tab keeps it to continue the conversation.
let sessionId = sessionStorage.getItem("tuneloop-session");
let intents = [];
let outOfScopeLabel = "out_of_scope";

function headers() {
  const key = localStorage.getItem("tuneloop-key");
  const h = { "content-type": "application/json" };
  if (key) h["x-api-key"] = key;
  return h;
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers() }
                                                        : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (response.status === 401) {
    const key = prompt("This server needs an API key:");
    if (key) { localStorage.setItem("tuneloop-key", key); return call(path, body); }
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function badge(text, className) { return element("span", `badge ${className || ""}`, text); }

function addUser(text) {
  document.getElementById("log").append(element("div", "msg user", text));
}

function addReply(turn) {
  const box = element("div", "msg bot");
  box.dataset.turnId = turn.turn_id;
  box.append(element("div", "reply", turn.reply));
  const badges = element("div", "badges");
  badges.append(turn.intent ? badge(`intent: ${turn.intent} ${(turn.confidence * 100).toFixed(0)}%`, "intent")
                            : badge("out of scope", "oos"));
  badges.append(badge(`sentiment: ${turn.sentiment}`, `sentiment sentiment-${turn.sentiment}`));
  if (turn.faq_question) badges.append(badge(`FAQ: ${turn.faq_question}`, "faq"));
  if (turn.escalate) badges.append(badge(`→ human (${turn.reason})`, "escalate"));
  box.append(badges);

  const actions = element("div", "actions");
  const up = element("button", "thumb up", "👍 yes");
  const down = element("button", "thumb down", "👎 no");
  up.title = "Helpful"; down.title = "Not helpful";
  up.setAttribute("aria-pressed", "false"); down.setAttribute("aria-pressed", "false");
  const note = element("span", "thanks");
  const rate = async (rating, pressed, other) => {
    try {
      await call("/v1/feedback", { turn_id: turn.turn_id, rating });
      pressed.setAttribute("aria-pressed", "true"); other.setAttribute("aria-pressed", "false");
      note.textContent = "thanks!";
    } catch (error) { note.textContent = error.message; note.className = "error"; }
  };
  up.onclick = () => rate(1, up, down);
  down.onclick = () => rate(-1, down, up);

  const fix = element("select", "correct-intent");
  fix.append(new Option("wrong intent? pick the right one", ""));
  for (const name of intents) fix.append(new Option(name, name));
  fix.append(new Option("out of scope (not for this assistant)", outOfScopeLabel));
  fix.onchange = async () => {
    if (!fix.value) return;
    try {
      await call("/v1/feedback", { turn_id: turn.turn_id, corrected_label: fix.value });
      note.textContent = `thanks — noted as ${fix.value === outOfScopeLabel ? "out of scope" : fix.value}`;
      fix.disabled = true;
    } catch (error) { note.textContent = error.message; note.className = "error"; }
  };
  actions.append(up, down, fix, note);
  box.append(actions);
  document.getElementById("log").append(box);
  box.scrollIntoView({ block: "end" });
}

async function send(event) {
  event.preventDefault();
  const input = document.getElementById("message");
  const button = document.getElementById("send");
  const status = document.getElementById("status");
  const text = input.value.trim();
  if (!text) return;
  addUser(text);
  input.value = "";
  button.disabled = true;
  status.textContent = "";
  try {
    let turn;
    try {
      turn = await call("/v1/chat", sessionId ? { session_id: sessionId, message: text } : { message: text });
    } catch (error) {  // a session the server no longer knows (or from an older page): start a new one
      if (!sessionId || !error.message.includes("no chat session")) throw error;
      turn = await call("/v1/chat", { message: text });
    }
    sessionId = turn.session_id;
    sessionStorage.setItem("tuneloop-session", sessionId);
    addReply(turn);
  } catch (error) {
    status.textContent = error.message;
  } finally {
    button.disabled = false;
    input.focus();
  }
}

async function start() {
  try {
    const info = await call("/v1/assistant");
    intents = info.intents;
    outOfScopeLabel = info.out_of_scope_label;
    document.getElementById("title").textContent = info.name;
    document.getElementById("subtitle").textContent = `${info.intent_model} · ${info.sentiment_model}`;
    document.title = `${info.name} — tuneloop`;
  } catch (error) {
    document.getElementById("status").textContent = error.message;
  }
  document.getElementById("composer").addEventListener("submit", send);
  document.getElementById("message").focus();
}

start();
