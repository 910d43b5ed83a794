"""Whether a half-precision rollout copy pays: RL rollouts (Engine.generate_batch) on the
fp32 policy vs on a bf16/fp16 copy re-synced from the policy before every batch (the
sync is timed in), interleaved in one process. Random weights of the given preset.

    python benchmarks/rollout_precision.py [--preset small] [--prompts 16] [--n 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from glassbox.config import ModelConfig
from glassbox.infer.precision import choose_dtype
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.train.finetune import RolloutConfig, rollout_engine, sample_rollouts

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(describe(), flush=True)
    torch.manual_seed(0)
    policy = Transformer(ModelConfig.from_name(args.preset)).train()
    auto = choose_dtype(policy, None, "auto", batch=64)  # as rollout_engine does
    names = ["fp32"] + [n for n in ("bf16", "fp16") if n != "fp32"]
    engines = {
        n: rollout_engine(policy, None, RolloutConfig(rollout_dtype=n, max_seqs=64)) for n in names
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (32,), generator=g).tolist() for _ in range(args.prompts)]
    params = SamplingParams(temperature=1.0, seed=0)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats + 1):  # the first round warms up
        for n, engine in engines.items():
            t = time.perf_counter()
            out = sample_rollouts(engine, prompts, args.n, params, args.max_tokens)
            times[n].append(time.perf_counter() - t)
            assert len(out) == args.prompts * args.n
    tokens = args.prompts * args.n * args.max_tokens
    base = statistics.median(times["fp32"][1:])
    print(f"{args.preset}: {args.prompts} prompts x {args.n} samples x {args.max_tokens} "
          f"tokens, median of {args.repeats}; auto would pick {auto.name}")  # fmt: skip
    print("| rollouts on | s per batch (sync included) | tokens/s | vs fp32 |")
    print("|---|---|---|---|")
    for n in names:
        med = statistics.median(times[n][1:])
        print(f"| {n} | {med:.2f} | {tokens / med:.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
