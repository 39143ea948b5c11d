"""The queue panel: one small page (GET /api/v1/queue/panel) over the queue API, for people.

It shows the caller's queued and running jobs (admins: everyone's) with position, worker and
ETA, and steers them with the same routes a script uses. Values are set as text, never as HTML.
"""
from __future__ import annotations

PANEL_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Atelier queue</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-top:1em}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}
button{margin-right:.3em}#status{margin-left:1em;color:#555}input{width:4em}
</style></head><body>
<h1>Queue</h1>
<div><button id="pause-mine">Pause my jobs</button><button id="resume-mine">Resume my jobs</button>
<button id="pause-all">Pause all</button><button id="resume-all">Resume all</button><span id="status"></span></div>
<div id="workers"></div>
<table><thead><tr><th>#</th><th>job</th><th>owner</th><th>state</th><th>worker</th><th>ETA</th>
<th>priority</th><th></th></tr></thead><tbody id="jobs"></tbody></table>
<script>
"use strict";
const api = (path, body, method) => fetch("/api/v1/queue" + path, {method: method || (body ? "POST" : "GET"),
  headers: {"Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined});
const say = async (r) => { document.getElementById("status").textContent = r.ok ? "" :
  (await r.json()).detail; await refresh(); };
function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }
function button(td, label, title, action) {
  const b = document.createElement("button"); b.textContent = label; b.title = title;
  b.addEventListener("click", action); td.appendChild(b); return b; }
async function refresh() {
  const r = await api(""); if (!r.ok) return;
  const q = await r.json();
  document.getElementById("workers").textContent = "Workers: " + q.workers.map(
    w => w.name + " (" + (w.state || "") + (w.model ? ", " + w.model : "") + ")").join("; ") +
    (q.paused ? " \u2014 queue paused" : "") +
    (q.paused_owners.length ? " \u2014 paused: " + q.paused_owners.join(", ") : "");
  const body = document.getElementById("jobs"); body.textContent = "";
  const queued = q.jobs.filter(j => j.state === "queued").sort((a, b) => a.position - b.position);
  const running = q.jobs.filter(j => j.state === "running");
  for (const j of running.concat(queued)) {
    const row = body.insertRow(); row.dataset.id = j.id;
    cell(row, j.position === null ? "running" : String(j.position));
    cell(row, j.id.slice(0, 8)); cell(row, j.owner);
    cell(row, j.state + (j.paused ? " (paused)" : ""));
    cell(row, j.worker || ""); cell(row, j.eta === null ? "?" : Math.round(j.eta) + " s");
    cell(row, String(j.priority));
    const td = row.insertCell();
    if (j.state === "queued") {
      const lane = queued.filter(o => o.owner === j.owner).map(o => o.id), at = lane.indexOf(j.id);
      button(td, "\u2191", "earlier", () => api("/" + j.id + "/move", {index: Math.max(0, at - 1)}).then(say));
      button(td, "\u2193", "later", () => api("/" + j.id + "/move", {index: at + 1}).then(say));
      const input = document.createElement("input"); input.type = "number"; input.value = j.priority;
      input.className = "priority"; td.appendChild(input);
      button(td, "set priority", "admins only",
             () => api("/" + j.id + "/priority", {priority: Number(input.value)}).then(say));
    }
    button(td, "cancel", "cancel this job", () => api("/" + j.id, null, "DELETE").then(say));
  }
}
document.getElementById("pause-mine").onclick = () => api("/pause", {}).then(say);
document.getElementById("resume-mine").onclick = () => api("/resume", {}).then(say);
document.getElementById("pause-all").onclick = () => api("/pause", {all: true}).then(say);
document.getElementById("resume-all").onclick = () => api("/resume", {all: true}).then(say);
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
