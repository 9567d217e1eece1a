// hookline dashboard: plain JavaScript, no build step, nothing from other origins.
// The API key lives in memory and sessionStorage (localStorage only if "remember" is ticked) and
// is only ever sent in the Authorization header: the live stream is read with fetch, not
// EventSource, so the key never goes into a URL.
"use strict";

const STATES = ["pending", "processing", "ai_processing", "watermarking", "completed"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const KEY_NAME = "hookline.key";

const $ = (id) => document.getElementById(id);
let apiKey = "";
let liveAbort = null;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

async function apiError(response) {
  let code = "http_" + response.status;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_) {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, code, message);
}

function explain(error) {
  if (error instanceof ApiError && error.status === 401) {
    return `The API key was refused: ${error.message}. Check it and connect again.`;
  }
  if (error instanceof ApiError && error.status === 402) {
    return `Not enough credits: ${error.message}`;
  }
  return error.message || String(error);
}

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- the key --------------------------------------------------------------------------------

function storedKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

function keepKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  apiKey = "";
  $("key").value = "";
  closeTask();
  $("app").hidden = true;
  show($("whoami"), "");
}

async function connect(key, remember) {
  apiKey = key.trim();
  show($("key-error"), "");
  if (!apiKey) {
    show($("key-error"), "Enter an API key.");
    return;
  }
  try {
    const me = await api("/v1/me");
    keepKey(apiKey, remember);
    show($("whoami"), `${me.user}${me.admin ? " (admin)" : ""} · ${me.balance} credits`);
    $("app").hidden = false;
    route();
    await Promise.all([loadStyles(), loadTasks(), loadStats()]);
  } catch (error) {
    apiKey = "";
    $("app").hidden = true;
    show($("whoami"), "");
    show($("key-error"), explain(error));
  }
}

async function refreshMe() {
  const me = await api("/v1/me");
  show($("whoami"), `${me.user}${me.admin ? " (admin)" : ""} · ${me.balance} credits`);
}

// --- styles and submitting -----------------------------------------------------------------

async function loadStyles() {
  const { items } = await api("/v1/styles");
  const select = $("style");
  select.replaceChildren(el("option", { value: "" }, "(none)"));
  for (const style of items) {
    const name = style.name || style.id;
    select.append(el("option", { value: name }, `${name} · ${style.cost} credits`));
  }
}

async function submitTask(event) {
  event.preventDefault();
  const file = $("file").files[0];
  show($("submit-error"), "");
  if (!file) {
    show($("submit-error"), "Choose a photo first.");
    return;
  }
  $("submit").disabled = true;
  try {
    const upload = await api("/v1/uploads", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    const body = { inputs: [{ upload: upload.key }], prompt: $("prompt").value };
    if ($("style").value) body.style = $("style").value;
    const task = await api("/v1/tasks", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    watch(task);
    refreshMe().catch(() => {});
  } catch (error) {
    show($("submit-error"), explain(error));
  } finally {
    $("submit").disabled = false;
  }
}

// --- the live stream -------------------------------------------------------------------------

function parseFrame(block) {
  const frame = { id: null, event: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") frame.id = value;
    else if (field === "event") frame.event = value;
    else if (field === "data") frame.data += (frame.data ? "\n" : "") + value;
  }
  return frame;
}

// Reads /v1/tasks/{id}/events with fetch; resumes with Last-Event-ID if the connection drops.
async function streamEvents(taskId, onState, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    const headers = { Authorization: `Bearer ${apiKey}` };
    if (lastId) headers["Last-Event-ID"] = lastId;
    let finished = false;
    try {
      const response = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/events`, {
        headers,
        signal,
      });
      if (!response.ok) throw await apiError(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = parseFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (frame.event !== "state" || !frame.data) continue;
          if (frame.id) lastId = frame.id;
          const data = JSON.parse(frame.data);
          onState(data);
          if (TERMINAL.has(data.state)) finished = true;
        }
      }
      if (finished) return;
    } catch (error) {
      if (signal.aborted || error instanceof ApiError) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(500 * 2 ** attempt, 5000)));
  }
  throw new Error("the live stream kept dropping; reload the task list");
}

function renderStepper(current, seen) {
  // Steps before the furthest one reached are done, even if the stream opened after them.
  const failed = current === "failed" || current === "cancelled";
  const reached = Math.max(...[...seen].map((state) => STATES.indexOf(state)));
  const steps = failed ? [...STATES.slice(0, -1), current] : STATES;
  $("stepper").replaceChildren(
    ...steps.map((state, i) => {
      let cls = "";
      if (state === current) cls = failed ? "failed" : "current";
      else if (i < reached || seen.has(state)) cls = "done";
      return el("li", { class: cls }, state.replace("_", " "));
    }),
  );
}

function watch(task) {
  if (liveAbort) liveAbort.abort();
  liveAbort = new AbortController();
  const seen = new Set();
  $("live").hidden = false;
  $("live-id").textContent = task.id;
  $("live-log").replaceChildren();
  $("result").replaceChildren();
  show($("live-error"), "");
  const onState = (data) => {
    seen.add(data.state);
    const stateEl = $("live-state");
    stateEl.textContent = data.state;
    stateEl.dataset.state = data.state;
    const at = new Date(data.at).toLocaleTimeString();
    $("live-log").append(el("li", {}, `${at} ${data.event} → ${data.state}`));
    renderStepper(data.state, seen);
  };
  onState({ state: task.state, event: "created", at: task.created_at });
  streamEvents(task.id, onState, liveAbort.signal)
    .then(() => finish(task.id))
    .catch((error) => {
      if (!liveAbort.signal.aborted) show($("live-error"), explain(error));
    });
}

async function finish(taskId) {
  const task = await api(`/v1/tasks/${encodeURIComponent(taskId)}`);
  if (task.error) {
    $("live-detail").textContent = `${task.error.code}: ${task.error.message}`;
  } else {
    $("live-detail").textContent = `after ${task.attempts} attempt(s)`;
  }
  for (const output of task.outputs) {
    $("result").append(el("img", { src: output.url, alt: `result of ${task.id}`, class: "output" }));
  }
  await Promise.all([loadTasks(), loadStats(), refreshMe()]);
}

// --- recent tasks ----------------------------------------------------------------------------

async function loadTasks() {
  const { items } = await api("/v1/tasks?limit=20");
  const rows = items.map((task) => {
    const row = el(
      "tr",
      {},
      el("td", {}, new Date(task.created_at).toLocaleString()),
      el("td", {}, el("a", { href: taskHash(task.id) }, el("code", {}, task.id.slice(0, 12)))),
      el("td", { class: `state-${task.state}` }, task.state),
      el("td", {}, task.attempts),
      el("td", {}, task.style || ""),
      el("td", { class: "prompt", title: task.prompt }, task.prompt),
    );
    row.addEventListener("click", () => openTask(task.id));
    return row;
  });
  $("tasks").tBodies[0].replaceChildren(...rows);
}

// --- one task in detail: its facts and its timeline ---------------------------------------------
// Opened by clicking a task or at #/tasks/<id>; while the task is not terminal it is read again
// every DETAIL_REFRESH_MS. Everything a provider sent (headers, messages) is shown as text.

const TASK_ROUTE = /^#\/tasks\/([A-Za-z0-9_-]{1,64})$/;
const DETAIL_REFRESH_MS = 1500;
let detailTimer = null;

function taskHash(taskId) {
  return `#/tasks/${encodeURIComponent(taskId)}`;
}

function openTask(taskId) {
  if (location.hash === taskHash(taskId)) route();
  else location.hash = taskHash(taskId);
}

function route() {
  const match = TASK_ROUTE.exec(location.hash);
  if (match) showTask(match[1]).catch((error) => show($("detail-error"), explain(error)));
  else closeTask();
}

function closeTask() {
  clearTimeout(detailTimer);
  detailTimer = null;
  $("task-detail").hidden = true;
  $("task-detail").dataset.taskId = "";
}

async function showTask(taskId) {
  clearTimeout(detailTimer);
  const box = $("task-detail");
  const fresh = box.dataset.taskId !== taskId;
  box.dataset.taskId = taskId;
  box.hidden = false;
  $("detail-id").textContent = taskId;
  if (fresh) {
    for (const id of ["detail-facts", "detail-actions", "detail-outputs", "timeline"]) {
      $(id).replaceChildren();
    }
    box.scrollIntoView({ block: "start" });
  }
  const path = `/v1/tasks/${encodeURIComponent(taskId)}`;
  let task;
  let timeline;
  try {
    [task, timeline] = await Promise.all([api(path), api(`${path}/timeline`)]);
  } catch (error) {
    if (box.dataset.taskId === taskId) {
      const missing = error instanceof ApiError && error.status === 404;
      show($("detail-error"), missing ? `There is no task ${taskId} of yours.` : explain(error));
    }
    return;
  }
  if (box.dataset.taskId !== taskId) return; // another task was opened meanwhile
  show($("detail-error"), task.error ? `${task.error.code}: ${task.error.message}` : "");
  renderTask(task);
  renderTimeline(timeline.entries);
  if (!TERMINAL.has(task.state)) detailTimer = setTimeout(route, DETAIL_REFRESH_MS);
}

function renderTask(task) {
  const facts = [
    ["state", el("span", { class: `state-${task.state}` }, task.state)],
    ["attempts", task.attempts],
    ["provider", `${task.provider} · ${task.model}`],
    ["style", task.style || "(none)"],
    ["cost", `${task.cost} credits${task.refunded ? " (refunded)" : ""}`],
    ["created", new Date(task.created_at).toLocaleString()],
    ["updated", new Date(task.updated_at).toLocaleString()],
    ["prompt", task.prompt],
  ];
  $("detail-facts").replaceChildren(
    ...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]),
  );
  const actions = [];
  if (!TERMINAL.has(task.state)) {
    const button = el("button", { type: "button", class: "secondary" }, "Watch live");
    button.addEventListener("click", () => watch(task));
    actions.push(button);
  }
  $("detail-actions").replaceChildren(...actions);
  $("detail-outputs").replaceChildren(
    ...task.outputs.map((o) => el("img", { src: o.url, alt: `output of ${task.id}`, class: "thumb" })),
  );
}

function clockTime(at) {
  const d = new Date(at);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

function http(status) {
  return status === null || status === undefined ? "" : `HTTP ${status}`;
}

function ms(value) {
  return value === null || value === undefined ? "" : `${value} ms`;
}

function failure(error) {
  return error ? `${error.code}: ${error.message}` : "";
}

// The key facts of each kind of entry, in reading order; empty ones are left out.
const ENTRY_FACTS = {
  transition: (e) => [`${e.from || "—"} → ${e.to}`, `(${e.event})`, e.detail],
  submit: (e) => [
    e.error ? `failed: ${failure(e.error)}` : `job ${e.job_id}`,
    http(e.status_code),
    ms(e.latency_ms),
    `attempt ${e.attempt}${e.try > 1 ? ` try ${e.try}` : ""}`,
    e.sync ? `answered ${e.outcome || "nothing"}` : "",
    e.provider,
  ],
  webhook: (e) => [
    e.verified ? "verified" : `not verified: ${e.reason}`,
    e.verified && e.reason ? `refused: ${e.reason}` : "",
    e.delivery_id ? `delivery ${e.delivery_id}` : "",
    e.status ? `said ${e.status}` : "",
    e.result ? `→ ${e.result}` : "",
    e.message,
  ],
  poll: (e) => [
    `by ${e.by}`,
    e.status ? `answered ${e.status}` : `failed: ${failure(e.error)}`,
    e.reason,
    http(e.status_code),
    ms(e.latency_ms),
  ],
  delivery: (e) => [
    `${e.event} → ${e.url}`,
    `attempt ${e.attempt}`,
    e.status_code ? http(e.status_code) : "no answer",
    e.error,
    ms(e.latency_ms),
    e.next_retry_at ? `retry at ${clockTime(e.next_retry_at)}` : "",
  ],
};

function renderTimeline(entries) {
  $("timeline").replaceChildren(...entries.map(entryItem));
}

function entryItem(entry) {
  const facts = (ENTRY_FACTS[entry.kind] || (() => []))(entry).filter(Boolean);
  const item = el(
    "li",
    { class: `entry kind-${entry.kind}`, "data-kind": entry.kind },
    el("time", { datetime: entry.at }, clockTime(entry.at)),
    el("span", { class: "kind" }, entry.kind),
    el("span", { class: "facts" }, facts.join(" · ")),
  );
  if (entry.kind === "webhook") {
    item.dataset.verified = String(entry.verified);
    item.append(headersOf(entry.headers));
  }
  if (entry.truncated) item.append(el("span", { class: "note" }, " (cut to its size cap)"));
  return item;
}

function headersOf(headers) {
  const rows = Object.entries(headers).map(([name, value]) =>
    el("tr", {}, el("th", {}, name), el("td", {}, value)),
  );
  return el("details", {}, el("summary", {}, `${rows.length} headers`), el("table", {}, ...rows));
}

// --- KPIs ------------------------------------------------------------------------------------

function pct(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
}

function secs(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(value < 10 ? 2 : 0)} s`;
}

function kpi(label, value, note = "", extra = "") {
  return el(
    "div",
    { class: `kpi ${extra}` },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    el("div", { class: "note" }, note),
  );
}

async function loadStats() {
  const stats = await api(`/v1/stats?window_s=${$("window").value}`);
  const base = stats.baseline || {};
  $("kpi-cards").replaceChildren(
    kpi("tasks", String(stats.tasks), `${stats.settled} settled · ${stats.in_flight} running`),
    kpi("first-try success", pct(stats.first_try_success_rate), `seed: ${pct(base.first_try_success_rate)}`),
    kpi("final success", pct(stats.final_success_rate), `seed: ${pct(base.final_success_rate)}`),
    kpi("timeout rate", pct(stats.timeout_rate), "< 5 % ok · > 10 % redesign"),
    kpi("retries / task", stats.retries_per_task === null ? "–" : stats.retries_per_task.toFixed(2)),
    kpi("latency p50 / p95", `${secs(stats.latency_s.p50)} / ${secs(stats.latency_s.p95)}`, "created → completed"),
    kpi("verdict", stats.verdict || "no data", "the seed's rule", `verdict-${stats.verdict}`),
  );
  drawHistogram(stats.ai_latency_s);
}

function drawHistogram(ai) {
  const NS = "http://www.w3.org/2000/svg";
  const buckets = ai.histogram;
  const width = 480;
  const height = 150;
  const bottom = 30;
  const barWidth = width / buckets.length;
  const max = Math.max(1, ...buckets.map((b) => b.count));
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "AI latency histogram");
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  buckets.forEach((bucket, i) => {
    const h = ((height - bottom - 12) * bucket.count) / max;
    const x = i * barWidth + 2;
    const cls = bucket.from >= 60 ? "bar timeout" : bucket.from >= 40 ? "bar slow" : "bar";
    node("rect", { class: cls, x, y: height - bottom - h, width: barWidth - 4, height: h });
    if (bucket.count) node("text", { x: x + 2, y: height - bottom - h - 2 }, bucket.count);
    const label = bucket.to === null ? `${bucket.from}+` : `<${bucket.to}`;
    node("text", { x: x + 2, y: height - bottom + 12 }, label);
  });
  node("text", { x: 2, y: height - 4 }, `seconds · n=${ai.count} · p50 ${secs(ai.p50)} · p95 ${secs(ai.p95)}`);
  $("histogram").replaceChildren(svg);
}

// --- wiring ----------------------------------------------------------------------------------

function init() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect($("key").value, $("remember").checked);
  });
  $("forget").addEventListener("click", forgetKey);
  window.addEventListener("hashchange", () => {
    if (apiKey) route();
  });
  $("submit-form").addEventListener("submit", submitTask);
  $("refresh").addEventListener("click", () => {
    Promise.all([loadTasks(), loadStats()]).catch((e) => show($("submit-error"), explain(e)));
  });
  $("window").addEventListener("change", () => loadStats().catch(() => {}));
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file);
  });
  const key = storedKey();
  if (key) {
    $("key").value = key;
    $("remember").checked = Boolean(localStorage.getItem(KEY_NAME));
    connect(key, $("remember").checked);
  }
}

document.addEventListener("DOMContentLoaded", init);
