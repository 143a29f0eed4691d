// pocketlm review page: one document at a time, decisions saved to the server as they are made.
// Document text and meta are inserted with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let cur = null;      // the document shown (as the server returned it)
let editing = false;

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function say(msg) { $("message").textContent = msg || ""; }

function showSummary(s) {
  $("file").textContent = s.file;
  $("counts").textContent = `${s.accepted} accepted (${s.edited} edited) · ${s.rejected} rejected · ${s.undecided} to go`
    + (s.bad_lines ? ` · ${s.bad_lines} bad lines skipped` : "");
  $("done").hidden = s.undecided !== 0;
}

function showDoc(d) {
  cur = d;
  stopEditing();
  $("position").textContent = `document ${d.i + 1} of ${d.total} (line ${d.line})`;
  $("text").textContent = d.text;
  const st = $("status");
  st.className = "status " + (d.decision || "none");
  st.textContent = d.decision === "accept" ? (d.edited ? "accepted (edited)" : "accepted")
    : d.decision === "reject" ? "rejected" : "undecided";
  const info = $("info");
  info.replaceChildren();
  const row = (k, v) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = typeof v === "string" ? v : JSON.stringify(v);
    if (/conf/i.test(k) && typeof v === "number") {
      dd.classList.add("confidence");
      if (v < (v > 1 ? 60 : 0.6)) dd.classList.add("low");
    }
    info.append(dt, dd);
  };
  row("source", d.source);
  for (const [k, v] of Object.entries(d.meta)) row(k, v);
  const img = $("image");
  if (d.image) { img.src = `/api/image?i=${d.i}`; img.hidden = false; } else { img.removeAttribute("src"); img.hidden = true; }
  history.replaceState(null, "", `#${d.i}`);
}

async function load(i) {
  if (i < 0 || (cur && i >= cur.total)) return;
  try { showDoc(await api(`/api/doc?i=${i}`)); say(""); } catch (e) { say(e.message); }
}

async function decide(decision, text) {
  if (!cur) return;
  try {
    const r = await api(`/api/doc?i=${cur.i}`, text === undefined ? { decision } : { decision, text });
    showSummary(r.summary);
    if (decision !== null && cur.i + 1 < cur.total) await load(cur.i + 1); else showDoc(r.doc);
    say("");
  } catch (e) { say("not saved: " + e.message); }
}

function startEditing() {
  if (!cur) return;
  editing = true;
  const ed = $("editor");
  ed.value = cur.text;
  $("text").hidden = true;
  ed.hidden = false;
  ed.focus();
}

function stopEditing() {
  editing = false;
  $("editor").hidden = true;
  $("text").hidden = false;
}

async function nextUndecided() {
  const s = await api("/api/summary");
  showSummary(s);
  if (s.first_undecided !== null) await load(s.first_undecided);
}

document.addEventListener("keydown", (ev) => {
  if (editing) {
    if (ev.key === "Escape") { ev.preventDefault(); stopEditing(); }
    else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); decide("accept", $("editor").value); }
    return;
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const actions = {
    a: () => decide("accept"), r: () => decide("reject"), e: startEditing, u: () => decide(null),
    n: nextUndecided, ArrowRight: () => load(cur.i + 1), ArrowLeft: () => load(cur.i - 1),
    j: () => load(cur.i + 1), k: () => load(cur.i - 1),
  };
  const f = actions[ev.key];
  if (f && cur) { ev.preventDefault(); f(); }
});

(async () => {
  try {
    const s = await api("/api/summary");
    showSummary(s);
    if (s.total === 0) { say("the file has no documents"); return; }
    const fromHash = parseInt(location.hash.slice(1), 10);
    await load(Number.isInteger(fromHash) && fromHash < s.total ? fromHash : (s.first_undecided ?? 0));
    document.body.dataset.ready = "1";
  } catch (e) { say(e.message); }
})();
