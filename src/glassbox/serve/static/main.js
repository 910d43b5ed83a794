// Entry point: the key form, the tabs, the served models; each view lives in its module.
import { $, api, clearError, guarded, info, setKey, showError } from "./api.js";
import { initArena } from "./arena.js";
import { initAttention } from "./attention.js";
import { initChat } from "./chat.js";
import { initExplorer } from "./explorer.js";
import { initImages } from "./images.js";
import { initVision } from "./vision.js";

async function loadInfo() {
  const data = await api("v1/glassbox/info");
  Object.assign(info, data);
  for (const select of document.querySelectorAll(".model-select")) {
    const keep = select.value;
    select.replaceChildren(
      ...data.models.map((m) => new Option(`${m.id} (${m.context_length} tokens)`, m.id)),
    );
    if (data.models.some((m) => m.id === keep)) select.value = keep;
  }
  const second = $("ar-model-2");
  if (data.models.length > 1 && second.value === $("ar-model-1").value) {
    second.value = data.models[1].id;
  }
  $("status").textContent = `Connected: ${data.models.map((m) => m.id).join(", ")}.`;
  performance.mark("glassbox:connected"); // for benchmarks/playground.py
  $("ar-dir").textContent = data.arena_dir;
  $("at-limit").textContent = data.limits.max_attention_tokens;
  document.dispatchEvent(new CustomEvent("glassbox:info", { detail: data }));
}

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
      if (!(e.key in moves)) return;
      e.preventDefault();
      select(tabs[(moves[e.key] + tabs.length) % tabs.length], true);
    });
  });
}

function initKey() {
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    setKey($("api-key").value.trim());
    clearError();
    await guarded(loadInfo);
  });
  $("banner-close").addEventListener("click", clearError);
}

initTabs();
initKey();
initChat();
initExplorer();
initAttention();
initImages();
initVision();
initArena();
loadInfo().catch((e) => {
  $("status").textContent = "Not connected.";
  showError(e);
});
