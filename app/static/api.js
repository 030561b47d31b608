// The HTTP side of the web page (app.js): requests with the API key, OpenAI-shaped errors, server-sent events
// read from fetch streams, and the arguments field split as a shell would.

// -- requests --------------------------------------------------------------------------------------------------

// The API key to send (the page's key field); app.js sets it.
let apiKey = () => "";

export function useApiKey(read) {
  apiKey = read;
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// An OpenAI-shaped error body's message, else the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`.trim();
}

export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

export async function getJson(path) {
  return (await api(path)).json();
}

// Server-sent events from a fetch response: yields {event, data} (data lines joined by "\n"), as in the
// EventSource algorithm (one space after the colon is dropped; a blank line dispatches).
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (let line of lines) {
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length) yield { event, data: data.join("\n") };
        event = "message";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "event") event = text;
      else if (field === "data") data.push(text);
    }
  }
}

// -- arguments -------------------------------------------------------------------------------------------------

// Shell-like splitting of the arguments field: spaces separate, quotes group, backslash escapes.
export function splitArgs(text) {
  const args = [];
  let current = null;
  let quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < text.length) current += text[++i];
      else current += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      current = current ?? "";
    } else if (c === "\\" && i + 1 < text.length) {
      current = (current ?? "") + text[++i];
    } else if (/\s/.test(c)) {
      if (current !== null) args.push(current);
      current = null;
    } else {
      current = (current ?? "") + c;
    }
  }
  if (quote) throw new Error("unclosed quote in the arguments");
  if (current !== null) args.push(current);
  return args;
}
