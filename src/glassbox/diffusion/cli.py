"""`glassbox diffuse sample | eval`: thin typed wrappers over the pipeline and evaluation.

`glassbox diffuse train` is generated from the recipe's config (glassbox.train.diffusion)
by glassbox.cli, like every training command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from glassbox.errors import GlassboxError

app = typer.Typer(help="Image generation by diffusion.", no_args_is_help=True)


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="a directory made by `glassbox diffuse train`"),
    prompt: str | None = typer.Option(None, help="text prompt (text-conditioned models)"),
    label: str | None = typer.Option(None, "--class", help="class id or name (class models)"),
    steps: int = typer.Option(50, help="denoising steps"),
    sampler: str = typer.Option("ddim", help="ddim or ddpm"),
    eta: float = typer.Option(0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like"),
    guidance: float = typer.Option(3.0, help="classifier-free guidance scale (0 = uncond)"),
    seed: int = typer.Option(0, help="seed of the initial noise"),
    num: int = typer.Option(16, help="number of images"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    out: Path | None = typer.Option(None, help="PNG grid to write"),
    trajectory: Path | None = typer.Option(None, help="PNG of x_t and predicted x_0 over time"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Generate a PNG grid (and optionally a trajectory picture) for one prompt or class."""
    from glassbox.diffusion.pipeline import DiffusionPipeline, save_png, save_trajectory, to_pil

    if out is None and trajectory is None:
        raise GlassboxError("Nothing to write: give --out grid.png and/or --trajectory traj.png.")
    if num < 1 or num > 1024:
        raise GlassboxError(f"--num {num} is out of range: use 1 to 1024 images.")
    pipe = DiffusionPipeline.from_run(run_dir, device)
    if pipe.model.text is not None:
        if label is not None:
            raise GlassboxError("This model is text-conditioned: use --prompt, not --class.")
        cond: str | int = prompt if prompt is not None else ""
    else:
        if prompt is not None:
            raise GlassboxError(
                "This model is class-conditioned: use --class "
                f"({', '.join(pipe.model.config.class_names or [])}), not --prompt."
            )
        if label is None:
            raise GlassboxError("This model is class-conditioned: give --class, e.g. --class 3.")
        cond = int(label) if label.strip().isdigit() else label
    samples = pipe(
        [cond] * num,  # type: ignore[list-item]
        steps=steps,
        sampler=sampler,
        eta=eta,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        trajectory_points=8 if trajectory else 0,
    )
    if out is not None:
        save_png(to_pil(samples.images), out)
        typer.echo(f"wrote {out}")
    if trajectory is not None:
        title = f"{cond!r}: {sampler} {steps} steps, guidance {guidance}"
        save_trajectory(samples, trajectory, title=title)
        typer.echo(f"wrote {trajectory}")


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="a directory made by `glassbox diffuse train`"),
    samplers: str = typer.Option(
        "ddim:10,ddim:20,ddim:50,ddim:100,ddpm:1000", help="table rows: sampler:steps,..."
    ),
    guidance: str = typer.Option("0,1,3,5", help="table columns: guidance scales"),
    num: int = typer.Option(64, help="generated images per table cell"),
    batch_size: int = typer.Option(256, help="images per forward pass"),
    seed: int = typer.Option(0, help="seed of prompts and noise"),
    classifier_steps: int = typer.Option(600, help="training steps of the judging classifier"),
    prompts: str = typer.Option(
        "train", help="train (as in training) or combos (pairs builtin:shapes-holdout leaves out)"
    ),
    out: Path | None = typer.Option(None, help="output folder (default RUN_DIR/eval)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Score generated images with a classifier trained on real data; table over settings."""
    from glassbox.diffusion.evaluate import evaluate_run, parse_guidance, parse_samplers

    result = evaluate_run(
        run_dir,
        samplers=parse_samplers(samplers),
        guidance=parse_guidance(guidance),
        num=num,
        batch_size=batch_size,
        seed=seed,
        out=out,
        device=device,
        classifier_steps=classifier_steps,
        prompts=prompts,
    )
    typer.echo(result.markdown)
    typer.echo(f"wrote {result.out_dir}")
