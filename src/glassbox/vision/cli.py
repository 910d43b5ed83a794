"""`glassbox clip train | eval` and `glassbox vlm train | ask`.

The train commands are generated from their config dataclasses
(:mod:`glassbox.vision.train`) like every training command; ``register`` adds both
sub-apps to the main CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from glassbox.cli_config import config_command
from glassbox.errors import GlassboxError

clip_app = typer.Typer(help="Contrastive image-text model (CLIP).", no_args_is_help=True)
vlm_app = typer.Typer(
    help="Vision-language model: ask questions about images.", no_args_is_help=True
)


def _clip_train(cfg, explicit: set[str]) -> None:
    from glassbox.vision.train import train_clip

    last = train_clip(cfg, explicit)
    zs = {k: round(v, 3) for k, v in last.items() if k.startswith("zero_shot")}
    typer.echo(f"done: step {last.get('step')}, {zs}; wrote {cfg.out}/ (run `glassbox clip eval`)")


def _vlm_train(cfg, explicit: set[str]) -> None:
    from glassbox.vision.train import train_vlm

    last = train_vlm(cfg, explicit)
    qa = {k: round(v, 3) for k, v in last.items() if k.startswith("qa_")}
    typer.echo(f"done: step {last.get('step')}, held-out accuracy {qa}; wrote {cfg.out}/")


def _load(run_dir: str, architecture: str, device: str):
    from glassbox import checkpoint as ckpt
    from glassbox.device import resolve_device

    loaded = ckpt.load_checkpoint(run_dir, resolve_device(device))
    if loaded.architecture != architecture:
        made_by = {"clip": "glassbox clip train", "vlm": "glassbox vlm train"}[architecture]
        raise GlassboxError(
            f"{run_dir} holds a {loaded.architecture!r} checkpoint; pass a `{made_by}` output."
        )
    return loaded


@clip_app.command("eval")
def clip_eval(
    run_dir: str = typer.Argument(..., help="a directory made by `glassbox clip train`"),
    num: int = typer.Option(2000, help="held-out scenes (and as many with held-out pairs)"),
    out: Path | None = typer.Option(None, help="output folder (default RUN_DIR/eval)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Zero-shot accuracy per attribute, retrieval recall@1/5 and a PNG of the space."""
    from glassbox.vision.clip import embed_images, plot_space, retrieval, zero_shot
    from glassbox.vision.scenes import make_scenes

    if num < 10:
        raise GlassboxError(f"--num {num} is too small; use at least 10 scenes.")
    model = _load(run_dir, "clip", device).model
    out = out or Path(run_dir) / "eval"
    result = {}
    for split in ("heldout", "combos"):
        data = make_scenes(num, split)
        u = embed_images(model, data)
        result[split] = {"zero_shot": zero_shot(model, data, u), **retrieval(model, data, u=u)}
        if split == "heldout":
            png = plot_space(model, data, out / "space.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(
        "| split | shape | colour | size | position | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |"
    )
    typer.echo("|---|---|---|---|---|---|---|---|---|")
    for split, r in result.items():
        z = r["zero_shot"]
        cells = [z["shape"], z["colour"], z["size"], z["position"]]
        cells += [r["i2t_recall@1"], r["i2t_recall@5"], r["t2i_recall@1"], r["t2i_recall@5"]]
        typer.echo(f"| {split} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    typer.echo(f"wrote {out / 'eval.json'} and {png}")


@vlm_app.command("ask")
def vlm_ask(
    run_dir: str = typer.Argument(..., help="a directory made by `glassbox vlm train`"),
    question: str = typer.Argument(..., help="the question about the image"),
    image: list[Path] = typer.Option([], help="image file (repeatable; none = text only)"),
    max_tokens: int = typer.Option(32, help="most new tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int | None = typer.Option(None, help="sampling seed"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Answer a question about one or more images (time to first token on stderr)."""
    from glassbox.vision.scenes import load_image
    from glassbox.vision.vlm import IMAGE_MARKER, answer

    if temperature < 0:
        raise GlassboxError(f"--temperature {temperature} must be >= 0.")
    loaded = _load(run_dir, "vlm", device)
    model, tok = loaded.model, loaded.tokenizer
    pixels = [load_image(p, model.vision_cfg.image_size) for p in image]
    content = "".join(f"{IMAGE_MARKER}\n" for _ in pixels) + question
    t0 = time.perf_counter()
    first: list[float] = []
    text = answer(
        model, tok, [{"role": "user", "content": content}], pixels, max_tokens, temperature,
        seed, on_first_token=lambda: first.append(time.perf_counter() - t0),
    )  # fmt: skip
    typer.echo(text)
    ttft = f"{first[0] * 1000:.0f} ms" if first else "n/a"
    typer.secho(f"[{len(pixels)} image(s), time to first token {ttft}]", err=True, dim=True)


def register(app: typer.Typer) -> None:
    """Add `glassbox clip ...` and `glassbox vlm ...` to the main CLI."""
    from glassbox.vision.train import ClipTrainConfig, VLMTrainConfig

    clip_app.command(
        "train", help="Train a contrastive image-text model (ViT + transformer, InfoNCE)."
    )(config_command(ClipTrainConfig, _clip_train))
    vlm_app.command(
        "train", help="Train a vision-language model from a chat model and a CLIP run."
    )(config_command(VLMTrainConfig, _vlm_train, positional="base"))
    app.add_typer(clip_app, name="clip")
    app.add_typer(vlm_app, name="vlm")
