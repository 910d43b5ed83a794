// Next-token explorer: step token by token; at each step the top candidates before and
// after temperature / top-k / top-p / min-p (the engine's own filters, computed by the
// server), which survive, the entropy, the draw. Sliders re-ask the server live (the
// server caches the logits, so only the filters are recomputed); a row click branches.
import { $, api, debounce, el, guarded, num, showError, visible } from "./api.js";

const FILTERS = ["temperature", "top_k", "top_p", "min_p"];
let context = null; // token ids so far (prompt + generated)
let promptLength = 0;
let tokens = []; // [{id, text}] matching context
let current = null; // the last answer
let inflight = null;

function settings() {
  const s = { model: $("ex-model").value, top_n: num("ex-top_n") };
  for (const f of FILTERS) s[f] = Number($(`ex-${f}`).value);
  s.seed = (num("ex-seed") || 0) + (context ? context.length : 0);
  return s;
}

async function ask(body) {
  if (inflight) inflight.abort();
  inflight = new AbortController();
  const t0 = performance.now();
  const answer = await api("v1/glassbox/next_token", body, inflight.signal);
  inflight = null;
  answer.elapsed_ms = performance.now() - t0;
  return answer;
}

async function start() {
  const answer = await ask({ ...settings(), prompt: $("ex-prompt").value, chat: $("ex-chat").checked });
  context = answer.token_ids;
  promptLength = context.length;
  tokens = answer.tokens;
  show(answer);
}

async function refresh() {
  if (!context) return start();
  show(await ask({ ...settings(), token_ids: context }));
}

async function append(id, text) {
  if (!context) await start();
  context = [...context, id];
  tokens = [...tokens, { id, text }];
  show(await ask({ ...settings(), token_ids: context }));
}

function pct(p) {
  return p >= 0.001 || p === 0 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toExponential(0)}%`;
}

function bar(p, cls) {
  const fill = el("span", { class: `fill ${cls}` });
  fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
  return el("span", { class: "bar" }, fill, el("span", { class: "bar-label" }, pct(p)));
}

function show(answer) {
  current = answer;
  const text = $("ex-text");
  text.replaceChildren(
    el("span", { class: "chip prompt", title: "the prompt" },
      visible(tokens.slice(0, promptLength).map((t) => t.text).join(""))),
    ...tokens.slice(promptLength).map((t) =>
      el("span", { class: "chip gen", title: `token ${t.id}` }, visible(t.text))),
  );
  const c = answer.chosen;
  $("ex-summary").textContent =
    `${answer.survivors} of ${answer.vocab_size} tokens survive the filters; entropy ` +
    `${answer.entropy_raw.toFixed(2)} nats raw, ${answer.entropy_final.toFixed(2)} after filters. ` +
    `Drawn: "${visible(c.text)}" (id ${c.id}, p ${pct(c.p_final)}).` +
    (answer.stop ? " That is an end token: the engine would stop here." : "");
  const body = $("ex-table").tBodies[0];
  body.replaceChildren(...answer.candidates.map((cand) => {
    const status = cand.kept ? "kept" : `dropped by ${cand.dropped_by}`;
    const branch = () => guarded(() => append(cand.id, cand.text));
    const button = el("button", {
      type: "button",
      class: "tok-button",
      "aria-label": `Branch with token ${visible(cand.text)} (${status}, ${pct(cand.p_final)} after filters)`,
    }, visible(cand.text));
    button.addEventListener("click", (e) => {
      e.stopPropagation();
      branch();
    });
    const row = el("tr", {
      class: `${cand.kept ? "kept" : "dropped"}${cand.id === c.id ? " chosen" : ""}`,
      dataset: { tokenId: cand.id, kept: cand.kept, pFinal: cand.p_final, pTemperature: cand.p_temperature },
    },
    el("td", { class: "tok" }, button),
    el("td", {}, String(cand.id)),
    el("td", {}, bar(cand.p_raw, "raw")),
    el("td", {}, bar(cand.p_temperature, "temp")),
    el("td", {}, bar(cand.p_final, "final")),
    el("td", {}, cand.id === c.id ? `${status}, drawn` : status));
    row.addEventListener("click", branch); // the whole row is a click target too
    return row;
  }));
  $("ex-table").dataset.elapsedMs = answer.elapsed_ms.toFixed(1);
}

async function step(times) {
  for (let i = 0; i < times; i++) {
    if (!current) await start();
    if (current.stop) break;
    await append(current.chosen.id, current.chosen.text);
  }
}

export function initExplorer() {
  const live = debounce(() => guarded(refresh), 60);
  for (const f of FILTERS) {
    const input = $(`ex-${f}`);
    input.addEventListener("input", () => {
      $(`ex-${f}-out`).textContent = input.value;
      live();
    });
  }
  $("ex-top_n").addEventListener("change", live);
  $("ex-start").addEventListener("click", () => guarded(start));
  $("ex-step").addEventListener("click", () => guarded(() => step(1)));
  $("ex-run").addEventListener("click", () => guarded(() => step(10)));
  $("ex-back").addEventListener("click", () => guarded(async () => {
    if (!context || context.length <= promptLength) return;
    context = context.slice(0, -1);
    tokens = tokens.slice(0, -1);
    await refresh();
  }));
  document.addEventListener("glassbox:info", () => {
    if (!current) guarded(start).catch(showError);
  }, { once: true });
}
