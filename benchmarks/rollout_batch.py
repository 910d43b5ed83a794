"""Batch generation for RL rollouts: 64 samples of one prompt in one batch vs one by one.

The default model is the `tiny` preset (vocab 4096, random init) or a run directory
(`--run`). One prompt of 16 tokens, 64 samples of exactly 64 new tokens at temperature 1
(stop tokens suppressed, so every sample has the same length). Timed:

    batched:    engine.generate_batch([prompt], n=64)    (max_seqs=64, one prefill)
    one by one: 64 x engine.generate_batch([prompt], n=1)

Both include prefill, sampling and the per-token log-probabilities.

    nice -n 10 .venv/bin/python benchmarks/rollout_batch.py [--run runs/base] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from glassbox.config import ModelConfig
from glassbox.infer.engine import Engine
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

PROMPT, N, NEW = 16, 64, 64


def load(run: str | None) -> tuple[Transformer, list[int]]:
    if run is None:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=4096)).eval()
        prompt = torch.randint(0, 4096, (PROMPT,), generator=torch.Generator().manual_seed(1))
        return model, prompt.tolist()
    from glassbox.checkpoint import load_model_dir

    model, tok, _ = load_model_dir(run, "cpu")
    ids = [tok.eot_id, *tok.encode("Once upon a time, in a small village by the sea, there")]
    return model.eval(), ids[:PROMPT]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a run/checkpoint directory (default: tiny)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prompt = load(args.run)
    print(describe())
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    name = args.run or "tiny (random init)"
    print(f"model: {name}, {model.num_params() / 1e6:.2f}M params, vocab {model.cfg.vocab_size}; "
          f"prompt {len(prompt)} tokens, {N} x {NEW} new tokens")  # fmt: skip

    engine = Engine(model, None, max_seqs=N, max_len=len(prompt) + NEW)
    params = SamplingParams(temperature=1.0)

    def batch(n: int):
        return engine.generate_batch([prompt], n, params, NEW, stop_token_ids=())

    batch(4)  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    rollouts = batch(N)
    t_batch = time.perf_counter() - t0
    assert len(rollouts) == N and all(len(r.tokens) == NEW for r in rollouts)
    t0 = time.perf_counter()
    singles = [batch(1)[0] for _ in range(N)]
    t_single = time.perf_counter() - t0
    assert all(len(r.tokens) == NEW for r in singles)

    tokens = N * NEW
    print(f"batched    generate_batch(n={N}): {t_batch:7.2f} s  {tokens / t_batch:8.0f} tokens/s")
    print(f"one by one {N} x generate_batch(n=1): {t_single:7.2f} s  "
          f"{tokens / t_single:8.0f} tokens/s")  # fmt: skip
    print(f"ratio: {t_single / t_batch:.1f}x")


if __name__ == "__main__":
    main()
