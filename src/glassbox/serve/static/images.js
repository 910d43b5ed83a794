// Images: a served diffusion run's denoising trajectory (x_t and predicted x_0 at every
// step), played frame by frame; guidance and step count are controls.
import { $, api, guarded, info } from "./api.js";

let frames = [];
let timer = null;

function showFrame(i) {
  const f = frames[i];
  if (!f) return;
  $("img-xt").src = f.x_t;
  $("img-x0").src = f.x0;
  $("img-xt").hidden = $("img-x0").hidden = false;
  $("img-frame").value = i;
  $("img-frame-out").textContent = f.t < 0 ? "final image" : `step ${i + 1} of ${frames.length - 1}, t=${f.t}`;
}

async function denoise() {
  const prompt = $("img-prompt").value;
  const body = {
    run: $("img-run").value,
    prompt: /^\d+$/.test(prompt) ? Number(prompt) : prompt,
    steps: Number($("img-steps").value),
    guidance: Number($("img-guidance").value),
    seed: Number($("img-seed").value),
  };
  const data = await api("v1/glassbox/diffusion", body);
  frames = data.frames;
  $("img-frame").max = frames.length - 1;
  showFrame(frames.length - 1);
}

function play() {
  if (timer) {
    clearInterval(timer);
    timer = null;
    $("img-play").textContent = "Play";
    return;
  }
  let i = 0;
  $("img-play").textContent = "Pause";
  timer = setInterval(() => {
    showFrame(i++);
    if (i >= frames.length) play();
  }, 120);
}

/** A text run takes a caption; a class run a class name or number. */
function setPromptHint() {
  const run = (info.diffusion || []).find((r) => r.id === $("img-run").value);
  if (!run) return;
  const text = run.condition === "text";
  const input = $("img-prompt");
  input.placeholder = text ? "a caption" : run.condition;
  if (text && /^\d+$/.test(input.value)) input.value = "";
}

export function initImages() {
  document.addEventListener("glassbox:info", () => {
    const runs = info.diffusion || [];
    $("img-ui").hidden = runs.length === 0;
    $("img-none").textContent = runs.length ? "" :
      "No diffusion run is served. Start the server with --diffusion runs/NAME (a run from " +
      "`glassbox diffuse train`) to watch noise turn into an image here.";
    $("img-run").replaceChildren(...runs.map((r) => new Option(`${r.id} (${r.condition})`, r.id)));
    setPromptHint();
  });
  $("img-run").addEventListener("change", setPromptHint);
  $("img-go").addEventListener("click", () => guarded(denoise));
  $("img-play").addEventListener("click", play);
  $("img-frame").addEventListener("input", () => showFrame(Number($("img-frame").value)));
}
