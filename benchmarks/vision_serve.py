"""Images through the server: time to first token of a chat question with one image vs
the same question without it, and /v1/embeddings rates for images vs captions.

A live server (`glassbox serve vlm=VLM clip=CLIP` in a subprocess) and the official
`openai` client, streaming, one request at a time, so the time to first token
is the whole path: HTTP, base64 + PNG decoding, the ViT and projector on a worker thread,
the engine's prefill with the prompt's input vectors, the first sampled token, SSE.
The no-image request is the baseline: the ratio is what looking costs.

    OMP_NUM_THREADS=1 python benchmarks/vision_serve.py --vlm runs/vlm --clip runs/clip
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402
from serve_concurrent import wait_ready  # noqa: E402


def scene_urls(n: int) -> list[tuple[str, str]]:
    """(data URL, a colour question) for ``n`` held-out builtin:scenes images."""
    from glassbox.vision.scenes import make_scenes

    data = make_scenes(n, "heldout")
    out = []
    for img, qa in zip(data.images, data.qa, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        q = next((x.question for x in qa if x.kind == "colour"), qa[0].question)
        out.append((url, q))
    return out


def first_token_s(client: openai.OpenAI, content) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="vlm", messages=[{"role": "user", "content": content}], max_tokens=4,
        temperature=0, stream=True,
    )  # fmt: skip
    took = None
    for chunk in stream:
        if took is None and chunk.choices and chunk.choices[0].delta.content:
            took = time.perf_counter() - t0
    return took if took is not None else time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vlm", required=True, help="a `glassbox vlm train` run")
    p.add_argument("--clip", required=True, help="a `glassbox clip train` run")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    print(describe())
    cmd = [sys.executable, "-m", "glassbox.cli", "serve", f"vlm={args.vlm}", f"clip={args.clip}",
           "--port", str(args.port), "--dtype", args.dtype]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    wait_ready(base, proc)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    try:
        items = scene_urls(args.repeats)
        with_img = lambda u, q: [  # noqa: E731
            {"type": "image_url", "image_url": {"url": u}},
            {"type": "text", "text": q},
        ]
        for u, q in items[:5]:  # warm-up: first calls allocate
            first_token_s(client, with_img(u, q))
            first_token_s(client, q)
        img_s, txt_s = [], []
        for u, q in items:  # interleaved, so load changes hit both alike
            img_s.append(first_token_s(client, with_img(u, q)))
            txt_s.append(first_token_s(client, q))
        a, b = statistics.median(img_s), statistics.median(txt_s)
        print(f"time to first token, streaming over HTTP, median of {len(items)}:")
        print(f"  one image + question: {a * 1e3:.1f} ms")
        print(f"  question alone:       {b * 1e3:.1f} ms")
        p90 = sorted(img_s)[int(0.9 * len(img_s))]
        print(f"  ratio: {a / b:.2f}x  (p90 with image {p90 * 1e3:.1f} ms)")

        imgs = [{"type": "image_url", "image_url": {"url": u}} for u, _ in items]
        caps = ["a small red circle on the left"] * len(items)
        rates = {}
        for name, inputs in (("images", imgs), ("captions", caps)):
            t0 = time.perf_counter()
            for s in range(0, len(inputs), 4):  # --max-images is 4 by default
                client.embeddings.create(model="clip", input=inputs[s : s + 4])
            rates[name] = len(inputs) / (time.perf_counter() - t0)
        ratio = rates["images"] / rates["captions"]
        print(f"/v1/embeddings, 4 inputs a request: {rates['images']:.0f} images/s, "
              f"{rates['captions']:.0f} captions/s ({ratio:.2f}x)")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
