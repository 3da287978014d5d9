// The coordinator dashboard: polls the JSON endpoints and draws tables and one SVG chart.
// Plain JavaScript, no libraries, nothing fetched but this service's /api/*.
"use strict";

const REFRESH_MS = 2000;
const token = new URLSearchParams(location.hash.slice(1)).get("token");
let selected = null;

function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  return fetch(path, { headers }).then(async (response) => {
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const hint = response.status === 401 ? " (open this page as …/#token=YOUR_TOKEN)" : "";
      throw new Error(`${path}: ${response.status} ${body.error || ""}${hint}`);
    }
    return body;
  });
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function rate(value) {
  return value === null || value === undefined || value === 0 ? "-" : value.toFixed(1);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function drawJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const job of jobs) {
    const row = body.insertRow();
    row.className = "job" + (job.job_id === selected ? " selected" : "");
    row.dataset.jobId = job.job_id;
    row.dataset.state = job.state;
    row.dataset.engineState = job.engine_state || "";
    cell(row, job.job_id);
    cell(row, job.name);
    cell(row, job.state + (job.engine_state === "stopped" && job.state !== "RUNNING" ? " (stopped)" : ""), "state " + job.state);
    const bar = cell(row, "");
    bar.innerHTML = `<span class="bar"><span style="width:${(100 * job.progress).toFixed(1)}%"></span></span> `;
    bar.append(`${(100 * job.progress).toFixed(1)}%`);
    cell(row, `${job.rows_done}/${job.rows}`);
    cell(row, String(job.rows_failed));
    cell(row, rate(job.rows_per_second));
    cell(row, job.servers ? `${job.servers_alive}/${job.servers}` : "-");
    cell(row, when(job.submitted_at));
    row.addEventListener("click", () => { selected = job.job_id; refresh(); });
  }
}

function svg(tag, attributes, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Rows done (line, left scale) and rows/s per step (bars, right scale) against time.
function drawChart(points) {
  const chart = document.getElementById("rows-chart");
  chart.replaceChildren();
  chart.dataset.points = String(points.length);
  const [width, height, left, right, top, bottom] = [720, 240, 60, 60, 12, 28];
  const plotW = width - left - right, plotH = height - top - bottom;
  chart.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }));
  if (points.length < 2) {
    chart.append(svg("text", { x: left + 10, y: top + plotH / 2 }, "no chunk committed yet"));
    return;
  }
  const t0 = points[0].time, t1 = points[points.length - 1].time;
  const span = Math.max(t1 - t0, 1e-6);
  const maxRows = Math.max(...points.map((p) => p.rows_done), 1);
  const maxRate = Math.max(...points.map((p) => p.rows_per_second), 1e-6);
  const x = (t) => left + plotW * (t - t0) / span;
  const barW = Math.max(plotW / points.length - 1, 1);
  for (const p of points.slice(1)) {
    const h = plotH * p.rows_per_second / maxRate;
    chart.append(svg("rect", { class: "rate", x: x(p.time) - barW, y: top + plotH - h, width: barW, height: h }));
  }
  const line = points.map((p) => `${x(p.time).toFixed(1)},${(top + plotH - plotH * p.rows_done / maxRows).toFixed(1)}`);
  chart.append(svg("polyline", { class: "done", points: line.join(" ") }));
  chart.append(svg("text", { x: 4, y: top + 10 }, String(maxRows)));
  chart.append(svg("text", { x: 4, y: top + plotH }, "0"));
  chart.append(svg("text", { x: left + plotW + 4, y: top + 10 }, `${maxRate.toFixed(1)}/s`));
  chart.append(svg("text", { x: left, y: height - 8 }, new Date(t0 * 1000).toLocaleTimeString()));
  chart.append(svg("text", { x: left + plotW - 60, y: height - 8 }, `+${span.toFixed(1)} s`));
}

function drawDetail(job) {
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-id").textContent = job.job_id;
  const state = document.getElementById("detail-state");
  state.textContent = job.state;
  state.className = "state " + job.state;
  drawChart(job.history);
  const error = document.getElementById("detail-error");
  error.hidden = !job.error;
  error.textContent = job.error || "";
  drawParts(job.parts || []);
  document.getElementById("error-count").textContent = `(${job.rows_failed})`;
  const errors = document.querySelector("#errors tbody");
  errors.replaceChildren();
  for (const error of job.errors) {
    const row = errors.insertRow();
    cell(row, String(error.row)); cell(row, error.id); cell(row, error.code); cell(row, error.message);
  }
  const events = document.getElementById("events");
  events.replaceChildren();
  for (const event of job.events) {
    const item = document.createElement("li");
    item.textContent = `${when(event.time)} ${event.kind} ${event.state}: ${event.message}`;
    events.append(item);
  }
}

// A workflow's parts: a pipeline's stages, a sweep's model x source runs, an in-context job's runs.
function drawParts(parts) {
  document.getElementById("parts-section").hidden = parts.length === 0;
  const body = document.querySelector("#parts tbody");
  body.replaceChildren();
  for (const part of parts) {
    const row = body.insertRow();
    row.dataset.state = part.state;
    cell(row, part.label);
    cell(row, part.model);
    cell(row, part.state || "waiting");
    cell(row, `${part.rows_done}/${part.rows}` + (part.estimated ? " (not planned yet)" : ""));
    cell(row, String(part.rows_failed));
    cell(row, rate(part.rows_per_second));
  }
}

function drawServers(report) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const server of report.servers) {
    const row = body.insertRow();
    row.dataset.address = server.address;
    cell(row, server.address);
    cell(row, server.reachable ? (server.draining ? "draining" : "up") : "down: " + server.error,
         server.reachable ? "up" : "down");
    cell(row, server.device_name && server.device_name !== server.device ? `${server.device} (${server.device_name})` : server.device);
    cell(row, server.models.map((m) => `${m.name} ${m.state}`).join(", "));
    cell(row, String(server.queue_depth));
    cell(row, rate(server.models.reduce((sum, m) => sum + (m.rows_per_second || 0), 0)));
    cell(row, server.gpu ? `${server.gpu.utilization}% ${server.gpu.name}` : "-");
    const memory = server.gpu || (server.memory_total ? server : null);
    cell(row, memory ? `${(memory.memory_used / 2 ** 30).toFixed(1)}/${(memory.memory_total / 2 ** 30).toFixed(1)} GiB` : "-");
  }
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const [{ jobs }, servers] = await Promise.all([api("/api/jobs"), api("/api/servers")]);
    if (selected === null && jobs.length) selected = jobs[jobs.length - 1].job_id;
    drawJobs(jobs);
    drawServers(servers);
    if (selected !== null) drawDetail(await api(`/api/jobs/${encodeURIComponent(selected)}`));
    problem.hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    problem.textContent = String(error.message || error);
    problem.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
