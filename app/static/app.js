// The web page of Pie server: chat, inferlets (upload, run, watch), engine numbers. Plain DOM code, no
// dependencies. It uses the public HTTP API only (docs/api.md), with the API key typed into the header field
// (kept in localStorage). Every text that comes from the server or the user is inserted with textContent or
// text nodes, never as HTML.
import { api, getJson, splitArgs, sseEvents, useApiKey } from "./api.js";

const KEY_STORAGE = "pie.apiKey";
const POLL_MS = 2000;
const MAX_RUN_ROWS = 50;

const $ = (id) => document.getElementById(id);

const page = {
  history: [],           // the chat so far: [{role, content}]
  chatAbort: null,       // AbortController of the chat request in flight
  runId: null,           // the streamed run in flight
  runAbort: null,
  inferletNames: new Map(),  // inferlet id -> its names (for the runs table)
};

// -- small DOM helpers -----------------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = String(cell);
    tr.append(td);
  }
  return tr;
}

function formatBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

function formatTime(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

function setText(id, text) {
  $(id).textContent = String(text);
}

// -- server status and models ----------------------------------------------------------------------------------

async function refreshHealth() {
  const badge = $("server-status");
  try {
    const response = await fetch("/health");
    const body = await response.json();
    badge.dataset.state = response.ok ? "ready" : body.status || "unavailable";
    badge.textContent = response.ok ? "ready" : (body.status || "unavailable");
    badge.title = body.detail || "";
    return response.ok;
  } catch (_) {
    badge.dataset.state = "down";
    badge.textContent = "unreachable";
    return false;
  }
}

async function refreshModels() {
  const select = $("chat-model");
  const chosen = select.value;
  const models = (await getJson("/v1/models")).data;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === chosen)) select.value = chosen;
}

// -- chat ------------------------------------------------------------------------------------------------------

function addChatMessage(role, text) {
  const item = el("div", "msg " + role);
  item.append(el("div", "role", role), el("div", "text", text));
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function chatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value.trim();
  if (!content || page.chatAbort) return;
  setText("chat-error", "");
  input.value = "";
  const userItem = addChatMessage("user", content);
  page.history.push({ role: "user", content });
  const reply = addChatMessage("assistant", "");
  reply.dataset.state = "streaming";
  const text = reply.querySelector(".text");
  page.chatAbort = new AbortController();
  chatBusy(true);
  let finish = null;
  try {
    const body = {
      model: $("chat-model").value, messages: page.history, stream: true,
      max_tokens: Number($("chat-max-tokens").value) || 256,
      temperature: Number($("chat-temperature").value),
    };
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: page.chatAbort.signal,
      headers: { "Content-Type": "application/json" },
    });
    for await (const { data } of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          text.append(document.createTextNode(choice.delta.content));
          reply.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    page.history.push({ role: "assistant", content: text.textContent });
    reply.dataset.state = "done";
    if (finish) reply.append(el("div", "finish", "finish: " + finish));
  } catch (error) {
    const stopped = error.name === "AbortError";
    if (stopped && text.textContent) {  // keep what came before Stop as the answer
      page.history.push({ role: "assistant", content: text.textContent });
      reply.dataset.state = "done";
      reply.append(el("div", "finish", "stopped"));
    } else {
      page.history.pop();  // the turn did not happen: it is not sent again with the next message
      userItem.classList.add("failed");
      reply.remove();
      setText("chat-error", stopped ? "Stopped." : error.message);
    }
  } finally {
    page.chatAbort = null;
    chatBusy(false);
  }
}

function newChat() {
  if (page.chatAbort) page.chatAbort.abort();
  page.history = [];
  $("chat-log").replaceChildren();
  setText("chat-error", "");
}

// -- inferlets -------------------------------------------------------------------------------------------------

async function refreshInferlets() {
  const records = (await getJson("/v1/inferlets")).data;
  page.inferletNames = new Map();
  for (const r of records) page.inferletNames.set(r.id, [...(page.inferletNames.get(r.id) || []), r.name]);
  // A preinstalled inferlet not built yet has no id, size or date, only its status (built on its first run).
  $("inferlet-table").tBodies[0].replaceChildren(...records.map((r) => row(r.id ? [
    r.name, el("code", "", r.id.slice(0, 12)), formatBytes(r.size), formatTime(r.created)]
    : [r.name, r.status.replace("_", " "), "", ""])));
  const select = $("run-inferlet");
  const chosen = select.value;
  select.replaceChildren(...records.map((r) => new Option(r.name, r.name)));
  if (records.some((r) => r.name === chosen)) select.value = chosen;
}

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  const name = $("upload-name").value.trim();
  if (!file || !name) return;
  $("upload-button").disabled = true;
  setText("upload-status", `Uploading ${file.name} (${formatBytes(file.size)}); the server compiles it once…`);
  try {
    const response = await api("/v1/inferlets?name=" + encodeURIComponent(name), {
      method: "POST", body: file, headers: { "Content-Type": "application/wasm" },
    });
    const record = await response.json();
    await refreshInferlets();
    $("run-inferlet").value = record.name;
    setText("upload-status", `Uploaded "${record.name}" (id ${record.id.slice(0, 12)}…).`);
  } catch (error) {
    setText("upload-status", "Upload failed: " + error.message);
  } finally {
    $("upload-button").disabled = false;
  }
}

function fileChosen() {
  const file = $("upload-file").files[0];
  if (file && !$("upload-name").value.trim()) $("upload-name").value = file.name.replace(/\.wasm$/i, "");
}

function setRunStatus(state, text) {
  const status = $("run-status");
  status.dataset.state = state;
  status.textContent = text;
}

async function startRun(event) {
  event.preventDefault();
  const name = $("run-inferlet").value;
  if (!name || page.runAbort) return;
  let args;
  try {
    args = splitArgs($("run-args").value);
  } catch (error) {
    setRunStatus("failed", error.message);
    return;
  }
  const output = $("run-output");
  output.replaceChildren();
  let count = 0;
  setText("run-count", 0);
  setText("run-id", "-");
  setRunStatus("running", "starting…");
  page.runAbort = new AbortController();
  $("run-button").disabled = true;
  $("run-cancel").disabled = false;
  let ended = false;
  try {
    const response = await api(`/v1/inferlets/${encodeURIComponent(name)}/runs`, {
      method: "POST", body: JSON.stringify({ args, stream: true }), signal: page.runAbort.signal,
      headers: { "Content-Type": "application/json" },
    });
    page.runId = response.headers.get("x-run-id");
    setText("run-id", page.runId || "-");
    setRunStatus("running", "running");
    for await (const { event: kind, data } of sseEvents(response)) {
      if (kind === "message") {
        output.append(document.createTextNode(data));
        setText("run-count", ++count);
        output.scrollTop = output.scrollHeight;
      } else if (kind === "done") {
        const done = JSON.parse(data);
        setRunStatus(done.status, done.error ? `${done.status}: ${done.error}` : done.status);
        ended = true;
      }
    }
    if (!ended) setRunStatus("failed", "the stream ended without a final status");
  } catch (error) {
    setRunStatus(error.name === "AbortError" ? "cancelled" : "failed",
                 error.name === "AbortError" ? "cancelled" : error.message);
  } finally {
    page.runAbort = null;
    page.runId = null;
    $("run-button").disabled = false;
    $("run-cancel").disabled = true;
    refreshEngine();
  }
}

async function cancelRun(runId) {
  try {
    await api("/v1/runs/" + encodeURIComponent(runId), { method: "DELETE" });
  } catch (error) {
    setText("engine-error", "Cancel failed: " + error.message);
  }
  refreshEngine();
}

function cancelCurrentRun() {
  // DELETE ends the run on the server, which then closes the stream with `done: cancelled`; without a run id
  // yet, dropping the request cancels it too.
  if (page.runId) cancelRun(page.runId);
  else if (page.runAbort) page.runAbort.abort();
}

// -- engine panel ----------------------------------------------------------------------------------------------

function renderStats(stats) {
  const usage = Math.min(1, Math.max(0, stats.kv_cache_usage_perc));
  $("kv-meter").value = usage;
  setText("kv-usage", (usage * 100).toFixed(1) + " %");
  setText("stat-pages", `${stats.num_pages - stats.num_free_pages} / ${stats.num_pages}`);
  setText("stat-instances", stats.num_instances);
  setText("stat-requests-running", stats.num_requests_running);
  setText("stat-requests-waiting", stats.num_requests_waiting);
  setText("stat-runs-running", stats.num_runs_running);
  setText("engine-updated", `${stats.model} · updated ${new Date().toLocaleTimeString()}`);
}

function renderRuns(runs) {
  runs.sort((a, b) => b.created - a.created);
  $("run-table").tBodies[0].replaceChildren(...runs.slice(0, MAX_RUN_ROWS).map((run) => {
    const names = page.inferletNames.get(run.inferlet_id);
    let action = "";
    if (run.status === "running") {
      action = el("button", "secondary small", "Cancel");
      action.type = "button";
      action.addEventListener("click", () => cancelRun(run.id));
    }
    const status = el("span", "status", run.error ? `${run.status}: ${run.error}` : run.status);
    status.dataset.state = run.status;
    return row([el("code", "", run.id.slice(0, 16)), names ? names.join(", ") : run.inferlet_id.slice(0, 12),
                status, run.num_messages, formatTime(run.created), action]);
  }));
}

async function refreshEngine() {
  try {
    const [stats, runs] = await Promise.all([getJson("/v1/engine/stats"), getJson("/v1/runs")]);
    renderStats(stats);
    renderRuns(runs.data);
    setText("engine-error", "");
  } catch (error) {
    setText("engine-error", error.message);
  }
}

// -- start -----------------------------------------------------------------------------------------------------

async function refreshAll() {
  if (!(await refreshHealth())) return false;
  const results = await Promise.allSettled([refreshModels(), refreshInferlets(), refreshEngine()]);
  const failed = results.find((r) => r.status === "rejected");
  setText("chat-error", failed ? failed.reason.message : "");
  return !failed;
}

// Until the server is ready (the model loads in the background) and the key is right, retry; then poll the
// engine numbers while the page is visible.
async function poll(loaded) {
  if (!document.hidden) {
    if (!loaded) loaded = await refreshAll();
    else await Promise.allSettled([refreshHealth(), refreshEngine()]);
  }
  setTimeout(() => poll(loaded), POLL_MS);
}

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  useApiKey(() => key.value.trim());
  key.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, key.value.trim()));
  key.addEventListener("change", refreshAll);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => page.chatAbort && page.chatAbort.abort());
  $("chat-new").addEventListener("click", newChat);
  $("upload-form").addEventListener("submit", upload);
  $("upload-file").addEventListener("change", fileChosen);
  $("run-form").addEventListener("submit", startRun);
  $("run-cancel").addEventListener("click", cancelCurrentRun);
  poll(false);
}

init();  // a module runs once the document is parsed
