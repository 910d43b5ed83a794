"""POST /v1/glassbox/diffusion: a served diffusion run's denoising trajectory, every step
as two PNG data URLs (x_t and the predicted x_0), for the playground's Images view.

Diffusion runs are served with ``glassbox serve ... --playground --diffusion runs/NAME``
(``NAME=PATH`` renames). One trajectory is computed at a time, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from glassbox.errors import GlassboxError
from glassbox.serve.errors import APIError, bad_request

router = APIRouter(prefix="/v1/glassbox")

MAX_STEPS = 200
_LOCK = threading.Lock()


class DiffusionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str
    prompt: str | int = Field(..., description="A caption (text model) or a class (name or id).")
    steps: int = 25
    guidance: float = 3.0
    seed: int = 0


def describe(pipeline) -> str:
    """'text' or 'classes: a, b, c' (what the prompt field takes)."""
    m = pipeline.model
    if m.text is not None:
        return "text"
    names = m.config.class_names or [str(i) for i in range(m.num_classes)]
    return "classes: " + ", ".join(names)


def png_data_url(image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> a PNG data URL."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def trajectory(pipeline, body: DiffusionRequest) -> list[dict]:
    """Every step's x_t and predicted x_0 (shown in [0, 1]), then the final image."""
    with _LOCK:
        samples = pipeline([body.prompt], steps=body.steps, guidance=body.guidance,
                           seed=body.seed, batch_size=1, trajectory_points=body.steps)  # fmt: skip
    frames = []
    for t, xt, x0 in samples.trajectory:
        if t < 0:  # the final image, already in [0, 1]
            frames.append({"t": -1, "x_t": png_data_url(xt[0]), "x0": png_data_url(x0[0])})
        else:
            frames.append({"t": t, "x_t": png_data_url((xt[0] + 1) / 2),
                           "x0": png_data_url((x0[0] + 1) / 2)})  # fmt: skip
    return frames


def load_diffusion_runs(specs: list[str], device: str = "auto") -> dict:
    """``runs/shapes`` or ``name=runs/shapes`` -> {name: DiffusionPipeline}."""
    from glassbox.diffusion.pipeline import DiffusionPipeline
    from glassbox.serve.loading import parse_model_spec

    runs = {}
    for spec in specs:
        name, path = parse_model_spec(spec)
        if name in runs:
            raise GlassboxError(f"Two diffusion runs are named {name!r}; use NAME=PATH.")
        runs[name] = DiffusionPipeline.from_run(path, device)
    return runs


@router.post("/diffusion")
async def diffusion(body: DiffusionRequest, request: Request) -> dict:
    """The denoising trajectory of one image."""
    runs = request.app.state.playground.diffusion
    if body.run not in runs:
        raise APIError(404, f"No diffusion run {body.run!r} is served; served: {sorted(runs)} "
                       "(start the server with --diffusion runs/NAME).", param="run",
                       code="model_not_found")  # fmt: skip
    if not 1 <= body.steps <= MAX_STEPS:
        raise bad_request(f"steps={body.steps} is out of range; use 1..{MAX_STEPS}.", "steps")
    if not 0 <= body.seed < 2**63:
        raise bad_request(f"seed={body.seed} is out of range; use [0, 2**63).", "seed")
    pipeline = runs[body.run]
    try:
        frames = await asyncio.to_thread(trajectory, pipeline, body)
    except GlassboxError as e:
        param = "guidance" if "guidance" in str(e) else "prompt"
        raise bad_request(str(e), param) from None
    return {"run": body.run, "steps": body.steps, "frames": frames}
