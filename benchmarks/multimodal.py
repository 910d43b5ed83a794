"""Multimodal quality and speed: the contrastive model and the vision-language model.

    python benchmarks/multimodal.py --lm /work/bench/world-sft --out /tmp/mm

1. `glassbox clip train` on builtin:scenes (step and minute budgets below), then zero-shot
   accuracy per attribute on held-out single-object scenes, retrieval recall@1/5, and the
   same on scenes with held-out colour+shape pairs; the embedding-space PNG.
2. `glassbox vlm train LM --vision CLIP`, then held-out QA accuracy per question type
   with the image and without it (the same model, image removed), greedy answers.
3. Speed, each side by side with its baseline: images/s of the image encoder (batch 1
   vs batch 64), and time to first token of a question with one image vs the same
   question without an image.

Either training stage is skipped when its run directory already holds a model;
``--clip-run DIR`` uses an existing contrastive run instead of OUT/clip, and
``--vlm-option KEY=VALUE`` (repeatable) sets any `glassbox vlm train` option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

from glassbox import checkpoint as ckpt  # noqa: E402
from glassbox.vision.clip import embed_images, plot_space, retrieval, zero_shot  # noqa: E402
from glassbox.vision.scenes import make_scenes  # noqa: E402
from glassbox.vision.train import (  # noqa: E402
    ClipTrainConfig,
    VLMTrainConfig,
    train_clip,
    train_vlm,
)
from glassbox.vision.vlm import answer, evaluate_qa, image_messages  # noqa: E402


def train_or_reuse(out: Path, fn, cfg) -> dict:
    """Train into ``out`` unless it already holds a model; returns the last metrics row
    with the training's wall and CPU minutes (this process, all threads)."""
    if (out / "model.safetensors").is_file():
        print(f"reusing {out}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        return rows[-1] if rows else {}
    t, c = time.perf_counter(), time.process_time()
    last = fn(cfg)
    wall, cpu = (time.perf_counter() - t) / 60, (time.process_time() - c) / 60
    last = {**last, "wall_minutes": wall, "cpu_minutes": cpu}
    (out / "bench_train.json").write_text(json.dumps(last, indent=2) + "\n")
    return last


def clip_quality(run: Path, n: int, png: Path) -> dict:
    model = ckpt.load_checkpoint(run).model
    out = {}
    for split in ("heldout", "combos"):
        data = make_scenes(n, split)
        u = embed_images(model, data)
        out[split] = {"zero_shot": zero_shot(model, data, u), **retrieval(model, data, u=u)}
        if split == "heldout":
            plot_space(model, data, png)
    return out


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def speed(clip_run: Path, vlm_run: Path) -> dict:
    clip = ckpt.load_checkpoint(clip_run).model
    data = make_scenes(64, "heldout")
    x = data.floats()
    one = timed(lambda: clip.encode_image(x[:1]), 20)
    batch = timed(lambda: clip.encode_image(x), 5)
    loaded = ckpt.load_checkpoint(vlm_run)
    vlm, tok = loaded.model, loaded.tokenizer
    q = "How many red shapes are there?"

    def ttft(with_image: bool) -> float:
        t0, first = time.perf_counter(), []
        images = [data.images[0]] if with_image else []
        mark = lambda: first.append(time.perf_counter() - t0)  # noqa: E731
        answer(vlm, tok, image_messages(q, with_image), images, 1, on_first_token=mark)
        return first[0]

    for w in (True, False):  # warm-up
        ttft(w)
    img = statistics.median(ttft(True) for _ in range(15))
    txt = statistics.median(ttft(False) for _ in range(15))
    return {
        "encode_images_per_s_batch1": 1 / one,
        "encode_images_per_s_batch64": 64 / batch,
        "ttft_ms_one_image": img * 1000,
        "ttft_ms_no_image": txt * 1000,
        "image_tokens": vlm.image_tokens,
    }


def vlm_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> VLMTrainConfig fields, typed like the fields' defaults."""
    fields = {f.name: f for f in dataclasses.fields(VLMTrainConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.replace("-", "_")
        if key not in fields or not _:
            raise SystemExit(f"--vlm-option {pair!r}: use KEY=VALUE with a vlm train option.")
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out[key] = type(default)(value)
        elif default is None and value.replace(".", "", 1).isdigit():
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _budget(row: dict) -> str:
    wall, cpu = row.get("wall_minutes", float("nan")), row.get("cpu_minutes", float("nan"))
    return f"{row.get('step')} steps, {wall:.1f} min wall, {cpu:.1f} CPU-min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm", default="/work/bench/world-sft", help="chat model for the VLM")
    p.add_argument("--out", default="/tmp/multimodal", help="where runs are written")
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--clip-minutes", type=float, default=10.0)
    p.add_argument("--vlm-steps", type=int, default=800)
    p.add_argument("--vlm-minutes", type=float, default=10.0)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--eval-scenes", type=int, default=2000)
    p.add_argument("--qa-limit", type=int, default=200, help="held-out questions per type")
    p.add_argument("--png", default="docs/img/multimodal-space.png")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--clip-run", help="an existing `glassbox clip train` run to use")
    p.add_argument(
        "--vlm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `glassbox vlm train` option, e.g. features=stem+last",
    )
    args = p.parse_args()
    print(describe())
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    clip_run = Path(args.clip_run) if args.clip_run else out / "clip"
    vlm_run = out / "vlm"
    if args.clip_run and not (clip_run / "model.safetensors").is_file():
        raise SystemExit(f"--clip-run {clip_run} holds no model.safetensors.")
    clip_row = train_or_reuse(clip_run, train_clip, ClipTrainConfig(
        out=str(clip_run), max_steps=args.clip_steps, max_minutes=args.clip_minutes,
        num_images=args.num_images,
    ))  # fmt: skip
    q = clip_quality(clip_run, args.eval_scenes, Path(args.png))
    vlm_row = train_or_reuse(vlm_run, train_vlm, VLMTrainConfig(
        base=args.lm, vision=str(clip_run), out=str(vlm_run), max_steps=args.vlm_steps,
        max_minutes=args.vlm_minutes, num_images=args.num_images,
        **vlm_options(args.vlm_option),
    ))  # fmt: skip
    loaded = ckpt.load_checkpoint(vlm_run)
    held = make_scenes(args.eval_scenes, "heldout")
    seen = evaluate_qa(loaded.model, loaded.tokenizer, held, args.qa_limit, with_image=True)
    blind = evaluate_qa(loaded.model, loaded.tokenizer, held, args.qa_limit, with_image=False)
    seen_train = evaluate_qa(loaded.model, loaded.tokenizer, make_scenes(args.eval_scenes, "train"),
                             args.qa_limit)  # fmt: skip
    combos = make_scenes(args.eval_scenes, "combos")
    seen_combos = evaluate_qa(loaded.model, loaded.tokenizer, combos, args.qa_limit)
    s = speed(clip_run, vlm_run)
    result = {"clip": q, "clip_train": clip_row, "vlm_train": vlm_row,
              "qa_image": seen, "qa_no_image": blind, "qa_image_combos": seen_combos,
              "qa_image_train_scenes": seen_train, "vlm_options": args.vlm_option,
              "speed": s}  # fmt: skip
    (out / "multimodal.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ncontrastive: {_budget(clip_row)}")
    print("| split | shape | colour | size | position | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for split, r in q.items():
        z = r["zero_shot"]
        cells = [z["shape"], z["colour"], z["size"], z["position"], r["i2t_recall@1"],
                 r["i2t_recall@5"], r["t2i_recall@1"], r["t2i_recall@5"]]  # fmt: skip
        print(f"| {split} (single-object n={z['n_single']}) | "
              + " | ".join(f"{c:.3f}" for c in cells) + " |")  # fmt: skip
    print(f"\nVLM: {_budget(vlm_row)}; greedy exact match, <= {args.qa_limit} per type")
    print("| question type | with image | no image (same model) | with image, held-out pairs "
          "| with image, training scenes |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    nan = float("nan")
    for kind in seen:
        print(f"| {kind} | {seen[kind]:.3f} | {blind.get(kind, nan):.3f} | "
              f"{seen_combos.get(kind, nan):.3f} | {seen_train.get(kind, nan):.3f} |")  # fmt: skip
    one, many = s["encode_images_per_s_batch1"], s["encode_images_per_s_batch64"]
    print(f"\nimage encoder: {one:.0f} images/s at batch 1, {many:.0f} images/s at batch 64 "
          f"(ratio {many / one:.1f}x)")  # fmt: skip
    print(f"time to first token: {s['ttft_ms_one_image']:.1f} ms with one image "
          f"({s['image_tokens']} image tokens) vs {s['ttft_ms_no_image']:.1f} ms without "
          f"(ratio {s['ttft_ms_one_image'] / s['ttft_ms_no_image']:.2f}x)")  # fmt: skip
    print(f"wrote {out / 'multimodal.json'} and {args.png}")


if __name__ == "__main__":
    main()
