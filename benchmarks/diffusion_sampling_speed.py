"""Sampling speed: our pipeline vs diffusers' DDIMPipeline around a UNet2DModel.

Both generate the same number of 16x16 RGB images with 50 DDIM steps in batches of the
same size, on the same machine, in one process, interleaved (ours, theirs, ours, ...);
the table reports the median images/s of ``--repeats`` runs each. diffusers' pipeline is
unconditional (one U-Net pass per step), so the like-for-like figure is ours at guidance
1 (one pass per step, conditioned on a prompt); guidance 3 (two passes) is shown too.

The diffusers U-Net is configured to about the same parameter count as ours (printed).
Weights are random: speed does not depend on them.

    nice -n 10 .venv/bin/python benchmarks/diffusion_sampling_speed.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline, UNet2DModel
from diffusers import DDIMScheduler as HFDDIMScheduler

from glassbox.diffusion.data import load_data
from glassbox.diffusion.model import Denoiser, load_model, num_parameters
from glassbox.diffusion.pipeline import DiffusionPipeline
from glassbox.train.diffusion import build_model_config, preset

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def our_model(run: str | None) -> Denoiser:
    if run:
        return load_model(run)
    cfg = preset("default", "builtin:shapes", num_images=64)
    return Denoiser(build_model_config(cfg, load_data("builtin:shapes", "train", 16, 64))).eval()


def their_unet(layers_per_block: int, widths: tuple[int, int]) -> UNet2DModel:
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a trained run dir (default: random weights)")
    ap.add_argument("--num", type=int, default=64, help="images per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(describe(), flush=True)

    torch.manual_seed(0)
    ours = our_model(args.run)
    # Pick the diffusers layout closest in parameter count to ours.
    candidates = [(lpb, (w, 2 * w)) for lpb in (1, 2) for w in (24, 32, 40)]
    n_ours = num_parameters(ours)
    lpb, widths = min(candidates, key=lambda c: abs(num_parameters(their_unet(*c)) - n_ours))
    unet = their_unet(lpb, widths)
    sched_cfg = ours.config.scheduler
    hf_sched = HFDDIMScheduler(
        num_train_timesteps=sched_cfg.num_train_timesteps,
        beta_schedule=sched_cfg.beta_schedule,
        prediction_type=sched_cfg.prediction_type,
        timestep_spacing=sched_cfg.timestep_spacing,
        clip_sample=sched_cfg.clip_sample,
    )
    hf = DDIMPipeline(unet=unet, scheduler=hf_sched)
    hf.set_progress_bar_config(disable=True)
    pipe = DiffusionPipeline(ours)
    prompt = "a red circle" if ours.text is not None else 3
    conds = [prompt] * args.num

    def run_ours(guidance: float) -> float:
        t0 = time.perf_counter()
        pipe(conds, steps=args.steps, guidance=guidance, seed=0, batch_size=args.batch)
        return args.num / (time.perf_counter() - t0)

    def run_theirs() -> float:
        t0 = time.perf_counter()
        done = 0
        with torch.no_grad():
            while done < args.num:
                b = min(args.batch, args.num - done)
                hf(
                    batch_size=b,
                    num_inference_steps=args.steps,
                    output_type="np",
                    generator=torch.Generator().manual_seed(0),
                )
                done += b
        return args.num / (time.perf_counter() - t0)

    run_ours(1.0), run_theirs()  # warm-up
    g1, g3, th = [], [], []
    for _ in range(args.repeats):
        g1.append(run_ours(1.0))
        th.append(run_theirs())
        g3.append(run_ours(3.0))
    m1, m3, mt = statistics.median(g1), statistics.median(g3), statistics.median(th)

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"ours: {n_ours / 1e6:.3f}M params (U-Net + text encoder); diffusers UNet2DModel "
        f"(layers_per_block={lpb}, widths={widths}): {num_parameters(unet) / 1e6:.3f}M"
    )
    print(
        f"{args.num} images, {args.steps} DDIM steps, batch {args.batch}, median of {args.repeats}"
    )
    print("| pipeline | images/s | runs |")
    print("|---|---|---|")
    print(
        f"| glassbox, guidance 1 (1 pass/step) | {m1:.2f} | {', '.join(f'{v:.2f}' for v in g1)} |"
    )
    print(
        f"| glassbox, guidance 3 (2 passes/step) | {m3:.2f} | {', '.join(f'{v:.2f}' for v in g3)} |"
    )
    print(
        f"| diffusers DDIMPipeline + UNet2DModel | {mt:.2f} | {', '.join(f'{v:.2f}' for v in th)} |"
    )
    print(f"ratio ours (guidance 1) / diffusers images/s: {m1 / mt:.2f}")


if __name__ == "__main__":
    main()
