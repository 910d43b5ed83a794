"""Pretraining speed to quality on tinyshakespeare: glassbox's recipe vs a plain baseline.

Baseline: transformers' GPT2LMHeadModel, 4 layers, 128 wide, char-level, AdamW
(lr 1e-3, betas 0.9/0.99, warmup 100, cosine to 1e-4 over 2000 steps), batch 12 x 64 —
the classic small-GPT Shakespeare recipe. Ours: `glassbox pretrain` with its default
settings (vocabulary and context fitted to the corpus size, precision chosen by
measurement; `--recipe` overrides them). Both use the last 10% of the text as
validation, measure validation bits per UTF-8 byte on the whole validation split, and
count training time only (evaluation paused). Prints the time each needs to reach
2.72 bpb, their ratio, and our bpb after the budget (default 180 s).

    python benchmarks/pretrain_tinyshakespeare.py [--budget-s 180] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

TARGET_BPB = 2.72
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# Glassbox's recipe is the default CLI's: byte-level BPE fitted to the corpus (1024 for
# this 1.1 MB text), a Llama-layout model (tiny), context fitted to the corpus (128), Muon
# + AdamW, batch 16, cosine decay over the wall-clock budget, bf16 autocast where
# measured faster. Only the evaluation settings below differ from `glassbox pretrain`.
OURS: dict = {}


def split(text: str) -> tuple[str, str]:
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def baseline(text: str, budget_s: float, eval_every_s: float) -> list[tuple[float, float]]:
    """nanoGPT-style char-level GPT-2 in a plain AdamW loop; returns (train_s, val_bpb)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    train, val = split(text)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    tr = torch.tensor([stoi[c] for c in train])
    va = torch.tensor([stoi[c] for c in val])
    T, B = 64, 12
    torch.manual_seed(1337)
    cfg = GPT2Config(
        vocab_size=len(chars), n_positions=T, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    n_val = (len(va) - 1) // T
    val_x = torch.stack([va[i * T : i * T + T] for i in range(n_val)])
    val_y = torch.stack([va[i * T + 1 : i * T + T + 1] for i in range(n_val)])
    nbytes = sum(len(c.encode()) for c in val[1 : n_val * T + 1])

    @torch.no_grad()
    def val_bpb() -> float:
        model.eval()
        nats = 0.0
        for i in range(0, n_val, 256):
            logits = model(val_x[i : i + 256]).logits
            nats += F.cross_entropy(
                logits.flatten(0, 1), val_y[i : i + 256].flatten(), reduction="sum"
            ).item()
        model.train()
        return nats / math.log(2) / nbytes

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 100
        r = min(1.0, (it - 100) / 1900)
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * r))

    curve, train_s, next_eval, it = [], 0.0, eval_every_s, 0
    g = torch.Generator().manual_seed(1337)
    while train_s < budget_s:
        t0 = time.perf_counter()
        ix = torch.randint(len(tr) - T - 1, (B,), generator=g)
        x = torch.stack([tr[i : i + T] for i in ix])
        y = torch.stack([tr[i + 1 : i + T + 1] for i in ix])
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        loss = model(x, labels=None).logits
        loss = F.cross_entropy(loss.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        it += 1
        train_s += time.perf_counter() - t0
        if train_s >= next_eval:
            bpb = val_bpb()
            curve.append((train_s, bpb))
            print(f"  baseline  step {it:5d}  {train_s:6.1f}s  val_bpb {bpb:.3f}", flush=True)
            next_eval += eval_every_s
            if bpb <= TARGET_BPB:
                break
    return curve


def ours(
    text: str, budget_s: float, eval_every_steps: int, recipe: dict
) -> list[tuple[float, float]]:
    from glassbox.track import read_metrics
    from glassbox.train.pretrain import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tinyshakespeare.txt"
        data.write_text(text)
        cfg = PretrainConfig(
            out=str(Path(tmp) / "run"), data=[str(data)], val_fraction=0.1,
            max_steps=10**9, max_minutes=budget_s / 60, eval_interval=eval_every_steps,
            log_interval=eval_every_steps, eval_tokens=None, sample_tokens=0,
            checkpoint_interval=10**9, cache_dir=str(Path(tmp) / "cache"), device="cpu",
            **recipe,
        )  # fmt: skip
        pretrain(cfg)
        rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    return [(r["elapsed_s"], r["val_bpb"]) for r in rows if "val_bpb" in r]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, b in curve if b <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--baseline-max-s", type=float, default=360.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every-s", type=float, default=10.0)
    ap.add_argument("--eval-every-steps", type=int, default=20)
    ap.add_argument("--recipe", default="{}", help="JSON overrides of the OURS recipe")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    text = Path(args.data).read_text()
    recipe = OURS | json.loads(args.recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe {recipe}")

    base_curve = (
        [] if args.skip_baseline else baseline(text, args.baseline_max_s, args.eval_every_s)
    )
    our_curve = ours(text, args.budget_s, args.eval_every_steps, recipe)
    for t, b in our_curve:
        print(f"  glassbox  {t:6.1f}s  val_bpb {b:.3f}")

    tb, to = time_to(base_curve, TARGET_BPB), time_to(our_curve, TARGET_BPB)
    final = our_curve[-1][1] if our_curve else float("nan")
    print()

    def fmt(t: float | None) -> str:
        return f"{t:.1f}" if t else "not reached"

    print(f"| run | time to {TARGET_BPB} bpb (s) | val bpb at end |")
    print("|---|---|---|")
    if base_curve:
        print(f"| baseline GPT2LMHeadModel char-level | {fmt(tb)} | {base_curve[-1][1]:.3f} |")
    print(f"| glassbox | {fmt(to)} | {final:.3f} (after {args.budget_s:.0f} s) |")
    ratio = f"{to / tb:.3f}" if tb and to else "n/a"
    print(
        f"time-to-{TARGET_BPB}-bpb ratio glassbox/baseline: {ratio}; "
        f"glassbox bpb at {args.budget_s:.0f}s: {final:.3f}"
    )


if __name__ == "__main__":
    main()
