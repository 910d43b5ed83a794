// Chat: streaming replies, every sampling control, a context meter that applies the
// server's own rule (POST v1/glassbox/chat_context), stop, and structured output.
import { $, api, debounce, el, guarded, num, perFrame, showError, streamChat } from "./api.js";

const history = []; // {role, content, dropped?}
let controller = null;

function samplingBody() {
  const body = {
    model: $("chat-model").value,
    temperature: num("chat-temperature"),
    top_p: num("chat-top_p"),
    top_k: num("chat-top_k"),
    min_p: num("chat-min_p"),
    presence_penalty: num("chat-presence_penalty"),
    frequency_penalty: num("chat-frequency_penalty"),
    repetition_penalty: num("chat-repetition_penalty"),
  };
  const seed = num("chat-seed");
  if (seed !== null) body.seed = seed;
  const stop = $("chat-stop-strings").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  const bias = $("chat-logit-bias").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (bias.length) {
    body.logit_bias = {};
    for (const pair of bias) {
      const [id, value] = pair.split(":").map((x) => x.trim());
      if (!/^\d+$/.test(id) || value === undefined || Number.isNaN(Number(value))) {
        throw new Error(`logit_bias entry "${pair}" is not TOKEN_ID:BIAS (e.g. 42:-100).`);
      }
      body.logit_bias[id] = Number(value);
    }
  }
  const format = $("chat-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try {
      schema = JSON.parse($("chat-schema").value);
    } catch (e) {
      throw new Error(`The JSON schema is not valid JSON: ${e.message}`);
    }
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema } };
  }
  return body;
}

function conversation(extra) {
  const msgs = [];
  const system = $("chat-system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  for (const m of history) msgs.push({ role: m.role, content: m.content });
  if (extra) msgs.push({ role: "user", content: extra });
  return msgs;
}

/** Render a reply: JSON pretty-printed with a validity note, fenced code as blocks. */
export function renderReply(node, text, structured) {
  node.replaceChildren();
  if (structured) {
    try {
      const value = JSON.parse(text);
      node.append(el("span", { class: "badge ok" }, "valid JSON"),
        el("pre", { class: "json" }, JSON.stringify(value, null, 2)));
      return;
    } catch {
      if (text) node.append(el("span", { class: "badge bad" }, "not (yet) valid JSON"));
    }
  }
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) node.append(el("pre", { class: "code" }, part.replace(/^\w*\n/, "")));
    else if (part) node.append(el("span", {}, part));
  });
}

function addMessage(role, content) {
  const body = el("span", { class: "content" });
  const node = el("div", { class: `msg ${role}` }, el("strong", {}, `${role}: `), body);
  body.textContent = content;
  $("chat-log").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, body };
}

async function updateMeter(pending = "") {
  const msgs = conversation(pending || null);
  if (!msgs.some((m) => m.role === "user")) {
    $("chat-meter-text").textContent = "";
    $("chat-meter").value = 0;
    return null;
  }
  const fit = await api("v1/glassbox/chat_context", {
    model: $("chat-model").value,
    messages: msgs,
    max_tokens: num("chat-max_tokens"),
  });
  $("chat-meter").value = fit.used / fit.context_length;
  $("chat-meter-text").textContent =
    `${fit.used} of ${fit.context_length} tokens used, ${fit.left} left ` +
    `(${fit.reserve} kept for the reply); ` +
    `${fit.dropped} oldest message${fit.dropped === 1 ? "" : "s"} dropped.`;
  return fit;
}

async function send() {
  const text = $("chat-input").value.trim();
  if (!text || controller) return;
  const body = samplingBody();
  const fit = await updateMeter(text);
  // Mark the messages the context rule drops, so the transcript shows what the model sees.
  const dropped = fit.dropped;
  const turns = [...document.querySelectorAll("#chat-log .msg")];
  turns.slice(0, dropped).forEach((n) => n.classList.add("dropped"));
  history.push({ role: "user", content: text });
  addMessage("user", text);
  $("chat-input").value = "";
  const reply = addMessage("assistant", "");
  const structured = body.response_format !== undefined;
  controller = new AbortController();
  $("chat-stop").disabled = false;
  $("chat-send").disabled = true;
  const maxTokens = Math.min(num("chat-max_tokens"), fit.context_length - fit.used);
  let result = null;
  const render = perFrame((all) => renderReply(reply.body, all, structured));
  try {
    result = await streamChat(
      { ...body, messages: fit.messages, max_tokens: maxTokens },
      (_, all) => render(all),
      controller.signal,
    );
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    render.flush();
    const shown = result ? result.text : reply.body.textContent;
    history.push({ role: "assistant", content: shown });
    controller = null;
    $("chat-stop").disabled = true;
    $("chat-send").disabled = false;
  }
  if (result) {
    reply.node.dataset.finish = result.finish || "";
    const tokens = result.usage ? result.usage.completion_tokens : 0;
    const decodeS = (result.total_ms - (result.ttft_ms || 0)) / 1000;
    const speed = tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : 0;
    const s = $("chat-speed");
    s.dataset.ttftMs = (result.ttft_ms || 0).toFixed(1);
    s.dataset.tokens = tokens;
    s.dataset.tokensPerS = speed.toFixed(2);
    s.textContent = `first token ${Math.round(result.ttft_ms || 0)} ms, ` +
      `${speed.toFixed(1)} tokens/s, ${tokens} tokens, finish: ${result.finish}`;
  }
  await guarded(() => updateMeter());
}

export function initChat() {
  $("chat-send").addEventListener("click", () => guarded(send));
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      guarded(send);
    }
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-reset").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("chat-log").replaceChildren();
    guarded(() => updateMeter());
  });
  $("chat-format").addEventListener("change", () => {
    $("chat-schema-label").hidden = $("chat-format").value !== "json_schema";
  });
  const live = debounce(() => guarded(() => updateMeter($("chat-input").value.trim())), 300);
  $("chat-input").addEventListener("input", live);
  $("chat-system").addEventListener("input", live);
  $("chat-max_tokens").addEventListener("input", live);
}
