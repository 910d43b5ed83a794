// The one place the page talks to the server: same origin, relative URLs (so a reverse
// proxy's root path works), the key from memory on every call, errors as banners.

let apiKey = "";

/** What /v1/glassbox/info said: models, limits, diffusion runs, arena directory. */
export const info = { models: [], limits: {}, diffusion: [] };

export function setKey(key) {
  apiKey = key;
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.param = err.param || null;
    this.code = err.code || null;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function fail(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* not JSON: the status alone */
  }
  throw new ApiError(res.status, body);
}

/** GET or POST JSON; throws ApiError with the server's message and param. */
export async function api(path, body = undefined, signal = undefined) {
  const res = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!res.ok) await fail(res);
  return res.json();
}

/** GET raw bytes (for downloads) with the key. */
export async function apiBlob(path) {
  const res = await fetch(path, { headers: headers(false) });
  if (!res.ok) await fail(res);
  return res.blob();
}

/**
 * Stream a chat completion (server-sent events). Calls onDelta(text) per piece and
 * returns {text, finish, usage, ttft_ms, total_ms}.
 */
export async function streamChat(body, onDelta, signal) {
  const t0 = performance.now();
  const res = await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!res.ok) await fail(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let text = "";
  let finish = null;
  let usage = null;
  let ttft = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            if (ttft === null) ttft = performance.now() - t0;
            text += piece;
            onDelta(piece, text);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { text, finish, usage, ttft_ms: ttft, total_ms: performance.now() - t0 };
}

// -- the error banner -------------------------------------------------------------------

export function showError(e) {
  if (e && e.name === "AbortError") return;
  const banner = document.getElementById("banner");
  let msg = e instanceof ApiError ? e.message : String((e && e.message) || e);
  if (e instanceof ApiError) {
    msg = `Error ${e.status}${e.param ? ` (${e.param})` : ""}: ${msg}`;
    if (e.status === 401) msg += " Enter the server's API key above.";
  }
  document.getElementById("banner-text").textContent = msg;
  banner.hidden = false;
}

export function clearError() {
  document.getElementById("banner").hidden = true;
}

/** Run an async action, showing any error in the banner. */
export async function guarded(fn) {
  try {
    return await fn();
  } catch (e) {
    showError(e);
    return undefined;
  }
}

// -- small DOM helpers ------------------------------------------------------------------

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

export function num(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

/** Token text made visible: spaces as middle dots, newlines as the return symbol. */
export function visible(text) {
  return text.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5");
}

/** Call fn(latest value) at most once per animation frame (streams render at most 60/s). */
export function perFrame(fn) {
  let frame = null;
  let latest;
  const update = (value) => {
    latest = value;
    if (frame === null) {
      frame = requestAnimationFrame(() => {
        frame = null;
        fn(latest);
      });
    }
  };
  update.flush = () => {
    if (frame !== null) cancelAnimationFrame(frame);
    frame = null;
    if (latest !== undefined) fn(latest);
  };
  return update;
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
