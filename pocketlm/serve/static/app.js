// The pocketlm playground: streams completions from this server's /v1 API and sends feedback to /v1/feedback.
// Generated text is only ever inserted with textContent (a model can emit <script>); no innerHTML anywhere.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "pocketlm.history";
let apiKey = sessionStorage.getItem("pocketlm.key") || "";
let modelName = "";
let controller = null;
let current = null; // {prompt, params, texts: [..], mode: "single" | "pair"}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function status(text) { $("status").textContent = text; }

async function errorOf(res) {
  try { const body = await res.json(); return (body.error && body.error.message) || res.statusText; }
  catch (e) { return res.status + " " + res.statusText; }
}

async function loadModel() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (res.status === 401) { $("key-box").hidden = false; status("this server needs an API key"); return; }
  if (!res.ok) { status(await errorOf(res)); return; }
  const info = (await res.json()).data[0];
  modelName = info.id;
  $("model-name").textContent = `${info.id} · context ${info.context_length} tokens`;
  $("max-tokens").max = String(info.max_tokens_cap);
  $("key-box").hidden = true;
  status("ready");
}

function params() {
  const p = {
    max_tokens: parseInt($("max-tokens").value, 10) || 100,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
    top_k: parseInt($("top-k").value, 10) || 0,
  };
  if ($("seed").value !== "") p.seed = parseInt($("seed").value, 10);
  const stop = $("stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (stop) p.stop = [stop];
  return p;
}

// POST a streaming completion; onChunk(index, text, finishReason) for every choice chunk.
async function streamCompletion(body, onChunk, signal) {
  const res = await fetch("/v1/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, model: modelName, stream: true }),
  });
  if (!res.ok) throw new Error(await errorOf(res));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        for (const c of obj.choices) onChunk(c.index, c.text || "", c.finish_reason);
      }
    }
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("compare").disabled = busy;
  $("stop-btn").disabled = !busy;
}

async function run(mode) {
  const prompt = $("prompt").value;
  const p = params();
  const n = mode === "pair" ? 2 : 1;
  const outs = mode === "pair" ? [$("out-a"), $("out-b")] : [$("out-0")];
  $("single").hidden = mode !== "single";
  $("pair").hidden = mode !== "pair";
  for (const o of outs) o.textContent = "";
  for (const b of ["up", "down", "prefer-a", "prefer-b"]) { $(b).disabled = true; $(b).classList.remove("chosen"); }
  current = { prompt, params: p, texts: new Array(n).fill(""), mode, rated: null };
  controller = new AbortController();
  setBusy(true);
  status("generating…");
  const started = performance.now();
  try {
    await streamCompletion({ prompt, n, ...p }, (i, text) => {
      current.texts[i] += text;
      outs[i].textContent = current.texts[i]; // text, never HTML
    }, controller.signal);
    status(`done in ${((performance.now() - started) / 1000).toFixed(1)}s`);
    if (mode === "pair") { $("prefer-a").disabled = false; $("prefer-b").disabled = false; }
    else { $("up").disabled = false; $("down").disabled = false; }
    addHistory(current);
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : "error: " + e.message);
  } finally {
    setBusy(false);
    controller = null;
  }
}

async function sendFeedback(body) {
  const res = await fetch("/v1/feedback", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ ...body, source: "web", model: modelName, meta: { params: current.params } }),
  });
  if (!res.ok) { status("feedback not saved: " + (await errorOf(res))); return false; }
  status("feedback saved, thank you");
  return true;
}

async function rate(good) {
  if (!current) return;
  const ok = await sendFeedback({ kind: "rating", prompt: current.prompt, completion: current.texts[0], label: good });
  if (ok) {
    $(good ? "up" : "down").classList.add("chosen");
    $("up").disabled = true; $("down").disabled = true;
    current.rated = good ? "good" : "bad";
    saveHistory();
  }
}

async function prefer(index) {
  if (!current) return;
  const [a, b] = current.texts;
  if (a === b) { status("the two completions are identical: nothing to compare"); return; }
  const chosen = index === 0 ? a : b, rejected = index === 0 ? b : a;
  const ok = await sendFeedback({ kind: "compare", prompt: current.prompt, chosen, rejected });
  if (ok) {
    $(index === 0 ? "prefer-a" : "prefer-b").classList.add("chosen");
    $("prefer-a").disabled = true; $("prefer-b").disabled = true;
    current.rated = index === 0 ? "A better" : "B better";
    saveHistory();
  }
}

// ---- history (this browser only) ----
let history = [];
try { history = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]"); } catch (e) { history = []; }

function addHistory(entry) {
  history.unshift(entry);
  history = history.slice(0, 50);
  saveHistory();
}

function saveHistory() {
  try { localStorage.setItem(HISTORY_KEY, JSON.stringify(history)); } catch (e) { /* storage full or blocked */ }
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  history.forEach((h) => {
    const li = document.createElement("li");
    const first = (h.prompt + (h.texts[0] || "")).replace(/\s+/g, " ").slice(0, 90);
    li.textContent = first || "(empty prompt)";
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = (h.mode === "pair" ? "compare" : "single") + (h.rated ? " · " + h.rated : "");
    li.appendChild(tag);
    li.addEventListener("click", () => show(h));
    list.appendChild(li);
  });
}

function show(h) {
  current = h;
  $("prompt").value = h.prompt;
  $("single").hidden = h.mode !== "single";
  $("pair").hidden = h.mode !== "pair";
  if (h.mode === "pair") { $("out-a").textContent = h.texts[0]; $("out-b").textContent = h.texts[1]; }
  else $("out-0").textContent = h.texts[0];
  const open = !h.rated;
  for (const b of h.mode === "pair" ? ["prefer-a", "prefer-b"] : ["up", "down"]) {
    $(b).disabled = !open;
    $(b).classList.remove("chosen");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", () => run("single"));
  $("compare").addEventListener("click", () => run("pair"));
  $("stop-btn").addEventListener("click", () => controller && controller.abort());
  $("up").addEventListener("click", () => rate(true));
  $("down").addEventListener("click", () => rate(false));
  $("prefer-a").addEventListener("click", () => prefer(0));
  $("prefer-b").addEventListener("click", () => prefer(1));
  $("clear-history").addEventListener("click", () => { history = []; saveHistory(); });
  $("save-key").addEventListener("click", () => {
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem("pocketlm.key", apiKey);
    loadModel();
  });
  renderHistory();
  loadModel();
});
