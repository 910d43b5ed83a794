// Arena: two contestants (two models, or one model with two sampling settings) answer
// the same prompt, blind and in random order; the vote is appended by the server to the
// preference JSONL `glassbox reward` trains on; the leaderboard is re-read after each vote.
import { $, api, apiBlob, el, guarded, num, perFrame, showError, streamChat } from "./api.js";

let round = null; // {prompt, shown: [{name, text}, {name, text}]}

function contestants() {
  const mode = document.querySelector('input[name="ar-mode"]:checked').value;
  const m1 = $("ar-model-1").value;
  const m2 = $("ar-model-2").value;
  if (mode === "models") {
    if (m1 === m2) throw new Error("Pick two different models (or compare two sampling settings).");
    return [{ name: m1, model: m1, temperature: 0.7 }, { name: m2, model: m2, temperature: 0.7 }];
  }
  const t1 = num("ar-t1");
  const t2 = num("ar-t2");
  if (t1 === t2) throw new Error("Pick two different temperatures.");
  return [{ name: `${m1}@T=${t1}`, model: m1, temperature: t1 },
    { name: `${m1}@T=${t2}`, model: m1, temperature: t2 }];
}

function setVoting(on) {
  for (const id of ["ar-vote-a", "ar-vote-b", "ar-vote-tie", "ar-vote-bad"]) $(id).disabled = !on;
}

async function ask() {
  const text = $("ar-prompt").value.trim();
  if (!text) throw new Error("Write a prompt first.");
  const pair = contestants();
  if (Math.random() < 0.5) pair.reverse(); // blind: the order says nothing
  const prompt = [{ role: "user", content: text }];
  round = { prompt, shown: pair.map((c) => ({ name: c.name, text: "" })) };
  setVoting(false);
  $("ar-reveal").textContent = "";
  const slots = [$("ar-a"), $("ar-b")];
  slots.forEach((s) => s.replaceChildren());
  const max = num("ar-max");
  const renders = slots.map((slot) => perFrame((all) => {
    slot.textContent = all;
  }));
  const results = await Promise.all(pair.map((c, i) => streamChat(
    { model: c.model, messages: prompt, max_tokens: max, temperature: c.temperature },
    (_, all) => renders[i](all),
  )));
  results.forEach((r, i) => {
    round.shown[i].text = r.text;
    renders[i].flush();
    slots[i].textContent = r.text;
  });
  setVoting(true);
  $("ar-vote-a").focus();
}

async function vote(outcome) {
  if (!round) return;
  const [a, b] = round.shown;
  await api("v1/glassbox/arena/vote", {
    prompt: round.prompt,
    a: { name: a.name, content: a.text },
    b: { name: b.name, content: b.text },
    outcome,
  });
  setVoting(false);
  $("ar-reveal").textContent = `Recorded. A was ${a.name}, B was ${b.name}.`;
  round = null;
  await board();
}

function ci(lo, hi) {
  return `[${Math.round(lo)}, ${Math.round(hi)}]`;
}

export async function board() {
  const data = await api("v1/glassbox/arena/leaderboard");
  $("ar-votes").textContent = data.votes;
  $("ar-board").tBodies[0].replaceChildren(...data.players.map((p, i) => el("tr",
    { dataset: { name: p.name, bt: p.bt, games: p.games } },
    el("td", {}, String(i + 1)),
    el("td", {}, p.name),
    el("td", {}, `${Math.round(p.bt)} ${ci(...p.bt_ci)}`),
    el("td", {}, `${Math.round(p.elo)} ${ci(...p.elo_ci)}`),
    el("td", {}, String(p.games)),
    el("td", {}, `${p.wins} / ${p.ties} / ${p.losses}`))));
}

async function download(file) {
  const blob = await apiBlob(`v1/glassbox/arena/votes?file=${file}`);
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: file === "ties" ? "ties.jsonl" : "votes.jsonl" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function initArena() {
  $("ar-ask").addEventListener("click", () => guarded(ask));
  for (const id of ["ar-vote-a", "ar-vote-b", "ar-vote-tie", "ar-vote-bad"]) {
    $(id).addEventListener("click", () => guarded(() => vote($(id).dataset.outcome)));
  }
  $("ar-export").addEventListener("click", () => guarded(() => download("preferences")));
  $("ar-export-ties").addEventListener("click", () => guarded(() => download("ties")));
  document.addEventListener("glassbox:info", () => board().catch(showError));
}
