"""POST /v1/glassbox/vision: ask a served vision-language run about an uploaded image
(the playground's Images view). Runs are served with ``glassbox serve ... --playground
--vlm runs/NAME`` (``NAME=PATH`` renames); one answer is computed at a time, off the loop.

    {run, question, image: "data:image/png;base64,..." or null, max_tokens, temperature,
     seed} -> {answer, image_tokens, prompt_tokens, ttft_ms, total_ms}
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from glassbox.errors import GlassboxError
from glassbox.serve.errors import APIError, bad_request
from glassbox.serve.limits import ServeLimits
from glassbox.serve.state import get_state

router = APIRouter(prefix="/v1/glassbox")

MAX_QUESTION_CHARS = 2_000
MAX_NEW_TOKENS = 128
_LOCK = threading.Lock()


@dataclass
class VisionRun:
    """A loaded vision-language checkpoint."""

    model: object  # glassbox.vision.vlm.VisionLanguageModel
    tokenizer: object

    @property
    def image_size(self) -> int:
        return self.model.vision_cfg.image_size


def load_vision_runs(specs: list[str], device: str = "auto") -> dict[str, VisionRun]:
    """``runs/vlm`` or ``name=runs/vlm`` -> {name: VisionRun}; other checkpoints refused."""
    from glassbox.checkpoint import load_checkpoint
    from glassbox.device import resolve_device
    from glassbox.serve.loading import parse_model_spec

    runs: dict[str, VisionRun] = {}
    for spec in specs:
        name, path = parse_model_spec(spec)
        if name in runs:
            raise GlassboxError(f"Two vision-language runs are named {name!r}; use NAME=PATH.")
        loaded = load_checkpoint(path, resolve_device(device))
        if loaded.architecture != "vlm":
            raise GlassboxError(
                f"--vlm {path} holds a {loaded.architecture!r} checkpoint, not a "
                "vision-language model; point at a directory made by `glassbox vlm train`."
            )
        runs[name] = VisionRun(loaded.model, loaded.tokenizer)
    return runs


class VisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str
    question: str
    image: str | None = None  # a data URL (PNG, JPEG, ...); None asks without an image
    max_tokens: int = 32
    temperature: float = 0.0
    seed: int | None = None


def ask(run: VisionRun, body: VisionRequest, limits: ServeLimits) -> dict:
    """The answer, with the prompt's size and the time to the first token."""
    from glassbox.vision.api import decode_image
    from glassbox.vision.vlm import IMAGE_MARKER, answer, prompt_ids

    pixels = []
    if body.image is not None:
        pixels = [decode_image(body.image, "image", limits, run.image_size)]
    messages = [{"role": "user", "content": IMAGE_MARKER + "\n" + body.question if pixels
                 else body.question}]  # fmt: skip
    t0 = time.perf_counter()
    first: list[float] = []
    with _LOCK:
        try:
            ids, _ = prompt_ids(run.tokenizer, messages, len(pixels), run.model.image_tokens)
            text = answer(run.model, run.tokenizer, messages, pixels, body.max_tokens,
                          body.temperature, body.seed,
                          on_first_token=lambda: first.append(time.perf_counter()))  # fmt: skip
        except GlassboxError as e:  # a marker typed in the question, or too long a prompt
            raise bad_request(str(e), "question") from None
    end = time.perf_counter()
    return {
        "answer": text, "image_tokens": run.model.image_tokens if pixels else 0,
        "prompt_tokens": len(ids), "image_size": run.image_size,
        "ttft_ms": (first[0] - t0) * 1000 if first else None, "total_ms": (end - t0) * 1000,
    }  # fmt: skip


@router.post("/vision")
async def vision(body: VisionRequest, request: Request) -> dict:
    """Answer a question about an image (or without one: the model's language prior)."""
    runs = request.app.state.playground.vision
    if body.run not in runs:
        raise APIError(404, f"No vision-language run {body.run!r} is served; served: "
                       f"{sorted(runs)} (start the server with --vlm runs/NAME).",
                       param="run", code="model_not_found")  # fmt: skip
    if not body.question.strip():
        raise bad_request("question is empty; ask something about the image.", "question")
    if len(body.question) > MAX_QUESTION_CHARS:
        raise bad_request(f"question has {len(body.question)} characters; at most "
                          f"{MAX_QUESTION_CHARS}.", "question")  # fmt: skip
    if not 1 <= body.max_tokens <= MAX_NEW_TOKENS:
        raise bad_request(f"max_tokens={body.max_tokens} is out of range; use 1..{MAX_NEW_TOKENS}.",
                          "max_tokens")  # fmt: skip
    if not 0 <= body.temperature <= 100:
        raise bad_request(f"temperature={body.temperature} is out of range; use [0, 100].",
                          "temperature")  # fmt: skip
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise bad_request(f"seed={body.seed} is out of range; use [0, 2**63).", "seed")
    return await asyncio.to_thread(ask, runs[body.run], body, get_state(request).limits)
