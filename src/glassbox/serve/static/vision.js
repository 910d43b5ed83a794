// Ask a vision-language run about an uploaded image (POST v1/glassbox/vision). The image
// is read in the page as a data URL and sent in the request body; nothing is stored.
import { $, api, guarded, info } from "./api.js";

let imageUrl = null;

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Cannot read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

async function pick() {
  const file = $("vlm-file").files[0];
  if (!file) return;
  imageUrl = await readFile(file);
  const preview = $("vlm-preview");
  preview.src = imageUrl;
  preview.hidden = false;
}

async function ask() {
  const withImage = !$("vlm-noimage").checked;
  if (withImage && !imageUrl) throw new Error("Choose an image first (or tick 'ask without the image').");
  $("vlm-answer").textContent = "";
  $("vlm-meta").textContent = "thinking...";
  const r = await api("v1/glassbox/vision", {
    run: $("vlm-run").value,
    question: $("vlm-question").value,
    image: withImage ? imageUrl : null,
    max_tokens: Number($("vlm-max").value),
    temperature: Number($("vlm-temperature").value),
  });
  $("vlm-answer").textContent = r.answer;
  $("vlm-meta").textContent = `${r.prompt_tokens} prompt tokens` +
    (r.image_tokens ? ` (${r.image_tokens} of them the image, seen at ${r.image_size}x${r.image_size})` : ", no image") +
    `; first token ${Math.round(r.ttft_ms || 0)} ms, answer ${Math.round(r.total_ms)} ms.`;
}

export function initVision() {
  document.addEventListener("glassbox:info", () => {
    const runs = info.vision || [];
    $("vlm-ui").hidden = runs.length === 0;
    $("vlm-none").textContent = runs.length ? "" :
      "No vision-language run is served. Start the server with --vlm runs/NAME (a run from " +
      "`glassbox vlm train`) to upload an image and ask about it here.";
    $("vlm-run").replaceChildren(...runs.map((r) => new Option(`${r.id} (${r.image_size}px)`, r.id)));
  });
  $("vlm-file").addEventListener("change", () => guarded(pick));
  $("vlm-ask").addEventListener("click", () => guarded(ask));
  $("vlm-question").addEventListener("keydown", (e) => {
    if (e.key === "Enter") guarded(ask);
  });
}
