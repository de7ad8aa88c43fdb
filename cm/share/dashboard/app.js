// cm's dashboard: views of the cluster drawn from cm's HTTP API (/api/...), read-only.
// Every text that comes from the cluster (job names, users, reasons) is set as text, never
// as HTML. The open view is refreshed every second: a change reaches it within two.
"use strict";

const REFRESH_MS = 1000;
const STATE_COLOURS = {idle: "#66bb6a", mixed: "#ffa726", alloc: "#ef6c00", draining: "#7e57c2",
                       drained: "#7e57c2", "down*": "#c62828", down: "#c62828", unknown: "#90a4ae"};
const charts = {};
window.cmDashboard = {refreshes: 0, chartsDrawn: 0, lastError: null};   // for tests and the curious

async function api(path) {
  const response = await fetch(path, {cache: "no-store"});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null || cell === undefined ? "-" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

function bar(fraction, title) {
  const outer = el("span", null, "bar");
  const inner = el("span");
  inner.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  outer.appendChild(inner);
  outer.title = title;
  return outer;
}

function stateBadge(status) {
  const badge = el("span", status, "state " + status);
  badge.dataset.status = status;
  return badge;
}

function ago(t) {
  if (!t) return "-";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  if (s < 129600) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

function mem(mb) {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)}G` : `${mb}M`;
}

function when(t) {
  return new Date(t * 1000).toLocaleString();
}

function duration(s) {
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}

function nodeLink(name) {
  const a = el("a", name);
  a.href = `#node/${encodeURIComponent(name)}`;
  return a;
}

// ---- views ----

async function showNow() {
  const [{nodes}, {jobs}] = await Promise.all([api("/api/nodes"), api("/api/jobs")]);
  const up = nodes.filter(n => n.state === "UP");
  const cpus = up.reduce((a, n) => a + n.cpus, 0), alloc = up.reduce((a, n) => a + n.alloc_cpus, 0);
  const totals = document.getElementById("totals");
  totals.replaceChildren(
    ...[["nodes up", `${up.length}/${nodes.length}`], ["CPUs allocated", `${alloc}/${cpus}`],
        ["jobs running", jobs.filter(j => j.state === "RUNNING").length],
        ["jobs pending", jobs.filter(j => j.state === "PENDING").length]].map(([label, value]) => {
      const div = el("div", label); div.prepend(el("b", value)); return div;
    }));
  fill("nodes", nodes.map(n => {
    const live = n.state === "UP";        // a down node's last usage is no use
    const tr = row([nodeLink(n.name), stateBadge(n.status), `${n.alloc_cpus}/${n.cpus}`,
                    live ? bar(n.cpu_percent / 100, `${n.cpu_percent}%`) : "-",
                    live ? bar(n.mem_used_mb / n.mem_mb, `${mem(n.mem_used_mb)} of ${mem(n.mem_mb)}`) : "-",
                    live ? n.load : "-",
                    n.gpus ? `${n.alloc_gpus}/${n.gpus} ${n.gpu_model || ""}` : "-",
                    (n.job_labels || n.jobs).join(",") || "-", n.idle_since ? ago(n.idle_since) : "-",
                    n.heard_ago === null ? "-" : `${n.heard_ago}s ago`]);
    tr.dataset.node = n.name;
    tr.dataset.status = n.status;
    return tr;
  }));
}

function chartOf(id, config) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart(document.getElementById(id), config);
  window.cmDashboard.chartsDrawn += 1;
  return charts[id];
}

function timeLabels(samples) {
  return samples.map(s => new Date(s.t * 1000).toLocaleTimeString());
}

const lineOptions = (stacked) => ({
  animation: false, responsive: true, maintainAspectRatio: false, elements: {point: {radius: 0}},
  scales: {x: {ticks: {maxTicksLimit: 12}}, y: {stacked, beginAtZero: true}},
});

function perNode(samples, field) {
  const names = [...new Set(samples.flatMap(s => (s.nodes || []).map(n => n.name)))];
  return names.map((name, i) => ({
    label: name, borderColor: `hsl(${(i * 67) % 360},60%,45%)`, fill: false, borderWidth: 1.5,
    data: samples.map(s => { const r = (s.nodes || []).find(n => n.name === name); return r ? r[field] : null; }),
  }));
}

async function showHistory() {
  const range = document.getElementById("history-range").value;
  const {samples} = await api(`/api/history?range=${range}&detail=nodes`);
  const labels = timeLabels(samples);
  const area = (label, field, colour) => ({label, data: samples.map(s => s.cluster[field]), fill: true,
                                             backgroundColor: colour, borderColor: colour, borderWidth: 1});
  chartOf("chart-cpus", {type: "line", options: lineOptions(true), data: {labels, datasets: [
    area("allocated", "cpus_alloc", "#ef6c00"), area("idle", "cpus_idle", "#66bb6a"),
    area("down", "cpus_down", "#c62828")]}});
  chartOf("chart-node-cpu", {type: "line", options: lineOptions(false), data: {labels, datasets: perNode(samples, "cpu")}});
  chartOf("chart-node-mem", {type: "line", options: lineOptions(false), data: {labels, datasets: perNode(samples, "mem")}});
}

async function showHeatmap() {
  const range = document.getElementById("heatmap-range").value;
  const {samples} = await api(`/api/history?range=${range}&detail=status`);
  const names = [...new Set(samples.flatMap(s => Object.keys(s.status || {})))].sort(
    (a, b) => a.localeCompare(b, undefined, {numeric: true}));
  const canvas = document.getElementById("heatmap");
  const label = 90, cell = 14;
  canvas.width = Math.max(400, canvas.clientWidth || 1000);
  canvas.height = Math.max(40, names.length * cell + 20);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const width = (canvas.width - label) / Math.max(1, samples.length);
  ctx.font = "11px sans-serif";
  names.forEach((name, r) => {
    ctx.fillStyle = "#222";
    ctx.fillText(name, 2, r * cell + 11);
    samples.forEach((s, c) => {
      const status = (s.status || {})[name];
      if (!status) return;
      ctx.fillStyle = STATE_COLOURS[status] || "#cfd8dc";
      ctx.fillRect(label + c * width, r * cell, Math.ceil(width), cell - 2);
    });
  });
  if (samples.length) {
    ctx.fillStyle = "#555";
    ctx.fillText(new Date(samples[0].t * 1000).toLocaleString(), label, names.length * cell + 14);
  }
  window.cmDashboard.chartsDrawn += 1;
}

async function showNode(name) {
  const [{node, jobs, events}, {samples}] = await Promise.all([
    api(`/api/node/${encodeURIComponent(name)}`), api(`/api/history?range=1h&node=${encodeURIComponent(name)}`)]);
  document.getElementById("node-title").textContent = `node ${node.name}`;
  document.getElementById("node-facts").replaceChildren(
    ...[["state", node.status], ["CPUs", `${node.alloc_cpus}/${node.cpus}`], ["load", node.load],
        ["memory", `${mem(node.mem_used_mb)} of ${mem(node.mem_mb)}`],
        ["idle since", node.jobs.length ? "busy" : (node.idle_since ? when(node.idle_since) : "the head's start")],
        ["state since", node.state_since ? when(node.state_since) : "-"]].map(([label, value]) => {
      const div = el("div", label); div.prepend(el("b", value)); return div;
    }));
  fill("node-jobs", jobs.map(j => {
    const here = j.node_list.indexOf(node.name);
    const tasks = j.task_layout && j.task_layout.length ? j.task_layout[here] : j.ntasks / j.node_list.length;
    return row([j.array_id !== null && j.array_id !== undefined ? `${j.array_id}_${j.array_task}` : j.id,
                j.user, j.name, tasks, j.start_time ? when(j.start_time) : "-"]);
  }));
  const labels = timeLabels(samples);
  chartOf("chart-node", {type: "line", options: lineOptions(false), data: {labels, datasets: [
    {label: "CPU %", data: samples.map(s => s.node ? s.node.cpu : null), borderColor: "#ef6c00", fill: false},
    {label: "memory used %", data: samples.map(s => s.node ? 100 * s.node.mem / Math.max(1, s.node.mem_total) : null),
     borderColor: "#42a5f5", fill: false}]}});
  fill("node-events", events.map(e => row([when(e.t), e.kind, e.text])));
}

async function showQueue() {
  const [{jobs}, {users}, {events}] = await Promise.all([api("/api/jobs"), api("/api/users"), api("/api/events?limit=50")]);
  fill("jobs", jobs.map(j => row([
    j.array_id !== null && j.array_id !== undefined ? `${j.array_id}_${j.array_task}` : j.id, j.user, j.name, j.state,
    j.ntasks, j.node_list.join(",") || "-", duration(j.elapsed),
    j.state === "PENDING" ? `${j.expected_start ? "start " + when(j.expected_start) + " " : ""}(${j.reason || "-"})` : "-"])));
  fill("users", users.map(u => row([u.user, u.running, u.pending, u.cpus, u.cpu_hours_24h.toFixed(2),
                                    u.gpu_hours_24h.toFixed(2)])));
  fill("events", events.map(e => row([when(e.t), e.kind, e.text])));
}

// ---- which view, and refreshing it ----

function currentView() {
  let hash = "now";
  try { hash = decodeURIComponent(location.hash.slice(1)) || "now"; } catch (e) { /* a malformed hash: Now */ }
  if (hash.startsWith("node/")) return ["node", hash.slice(5)];
  return [["now", "history", "heatmap", "queue"].includes(hash) ? hash : "now", null];
}

async function refresh() {
  const [view, arg] = currentView();
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  try {
    if (view === "now") await showNow();
    else if (view === "history") await showHistory();
    else if (view === "heatmap") await showHeatmap();
    else if (view === "node") await showNode(arg);
    else await showQueue();
    window.cmDashboard.refreshes += 1;
    window.cmDashboard.lastError = null;
    document.getElementById("live").textContent = `live, ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    window.cmDashboard.lastError = String(e);
    document.getElementById("live").textContent = `cannot reach the cluster: ${e.message}`;
  }
}

let timer = null;
function schedule(delay) {
  clearTimeout(timer);
  // Charts are redrawn every 10 s (their data moves slowly); the tables every second.
  const [view] = currentView();
  timer = setTimeout(async () => { await refresh(); schedule(); },
                     delay !== undefined ? delay : (view === "now" || view === "queue" ? REFRESH_MS : 10 * REFRESH_MS));
}

window.addEventListener("hashchange", () => schedule(0));
for (const id of ["history-range", "heatmap-range"]) document.getElementById(id).addEventListener("change", () => schedule(0));
schedule(0);
