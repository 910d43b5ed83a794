// Tokens and attention: the prompt as tokens with ids; one head's weights as a heatmap
// (canvas) and as lines from each query to its keys (SVG). Weights come from
// POST v1/glassbox/attention (layers x heads x T x T, each query row summing to one).
import { $, api, el, guarded, visible } from "./api.js";

let data = null;
let query = null; // the query token whose lines are drawn (null = all, faint)
const SVG = "http://www.w3.org/2000/svg";

function headMap() {
  const layer = Number($("at-layer").value);
  const head = $("at-head").value;
  const heads = data.weights[layer];
  if (head !== "mean") return heads[Number(head)];
  const T = data.tokens.length;
  return Array.from({ length: T }, (_, q) =>
    Array.from({ length: T }, (_, k) => heads.reduce((s, h) => s + h[q][k], 0) / heads.length));
}

function drawHeatmap(w) {
  const canvas = $("at-heatmap");
  const T = w.length;
  const size = canvas.width;
  const cell = size / T;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      const v = Math.sqrt(w[q][k]); // sqrt: small weights stay visible
      ctx.fillStyle = `rgba(20, 60, 160, ${v})`;
      ctx.fillRect(k * cell, q * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  if (query !== null) {
    ctx.strokeStyle = "#c00";
    ctx.lineWidth = 2;
    ctx.strokeRect(0, query * cell, size, cell);
  }
  canvas.dataset.tokens = T;
}

function drawLines(w) {
  const svg = $("at-lines");
  const T = w.length;
  const height = Math.max(480, T * 14);
  svg.setAttribute("viewBox", `0 0 400 ${height}`);
  const y = (i) => ((i + 0.5) * height) / T;
  const nodes = [];
  const label = (i, x, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y(i) + 4);
    t.setAttribute("text-anchor", anchor);
    t.setAttribute("class", i === query ? "q on" : "q");
    t.textContent = visible(data.tokens[i].text).slice(0, 14);
    return t;
  };
  for (let q = 0; q < T; q++) {
    if (query !== null && q !== query) continue;
    for (let k = 0; k <= q; k++) {
      if (w[q][k] < 0.02) continue;
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", 110);
      line.setAttribute("y1", y(k));
      line.setAttribute("x2", 290);
      line.setAttribute("y2", y(q));
      line.setAttribute("stroke-width", (query === null ? 3 : 8) * w[q][k]);
      line.setAttribute("stroke-opacity", query === null ? 0.35 : 0.9);
      line.setAttribute("class", "att");
      nodes.push(line);
    }
  }
  for (let i = 0; i < T; i++) nodes.push(label(i, 104, "end"), label(i, 296, "start"));
  svg.replaceChildren(...nodes);
  svg.dataset.lines = nodes.filter((n) => n.tagName === "line").length;
}

function redraw() {
  if (!data) return;
  const w = headMap();
  drawHeatmap(w);
  drawLines(w);
}

function showTokens() {
  $("at-tokens").replaceChildren(...data.tokens.map((t, i) => {
    const chip = el("button", { type: "button", class: "chip token", title: `query ${i}` },
      visible(t.text), el("sub", {}, String(t.id)));
    const pick = () => {
      query = i;
      redraw();
    };
    chip.addEventListener("mouseenter", pick);
    chip.addEventListener("focus", pick);
    chip.addEventListener("click", pick);
    return chip;
  }));
}

async function load() {
  data = await api("v1/glassbox/attention", { model: $("at-model").value, prompt: $("at-prompt").value });
  query = null;
  const layer = $("at-layer");
  const head = $("at-head");
  layer.replaceChildren(...Array.from({ length: data.n_layer }, (_, i) => new Option(`${i}`, i)));
  head.replaceChildren(new Option("mean of heads", "mean"),
    ...Array.from({ length: data.n_head }, (_, i) => new Option(`${i}`, i)));
  head.value = "0";
  showTokens();
  redraw();
}

export function initAttention() {
  $("at-show").addEventListener("click", () => guarded(load));
  $("at-layer").addEventListener("change", redraw);
  $("at-head").addEventListener("change", redraw);
  $("at-lines").addEventListener("mouseleave", () => {
    query = null;
    redraw();
  });
}
