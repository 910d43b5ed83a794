"""RL rollout speed: our engine's batch API vs transformers' generate, as TRL uses it.

The rollout phase of `glassbox grpo` / `ppo`: B task prompts (chat-formatted, different
lengths), n samples each, `max_tokens` new tokens at temperature 1. Timed, same model,
same prompts:

    glassbox:     Engine.generate_batch(prompts, n, ...)  (continuous batching, KV cache
                  slots; the per-token log-probs come with the samples)
    transformers: LlamaForCausalLM.generate on the model exported with export_hf, the
                  B*n prompts left-padded in one batch (what TRL's GRPOTrainer does
                  without vLLM: each prompt repeated num_generations times), sampling
                  with top_k/top_p off; then the same + one forward pass for the
                  log-probs the trainer needs (TRL computes them after generating)

Every sample is exactly `max_tokens` long on both sides (stop tokens suppressed), so
the token counts are equal. (benchmarks/rollout_batch.py measures a different thing:
one prompt's n samples batched vs one by one, inside our engine.)

    nice -n 10 .venv/bin/python benchmarks/rollout_vs_trl.py --run runs/sft \\
        [--prompts 16] [--n 8] [--max-tokens 48] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from glassbox.checkpoint import load_model_dir
from glassbox.conversation import encode_prompt
from glassbox.infer.engine import Engine
from glassbox.infer.sampling import SamplingParams
from glassbox.interop.hf import export_hf

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def task_prompts(tok, count: int) -> list[list[int]]:
    """The first ``count`` train prompts of builtin:tasks, spread over the families."""
    from glassbox.tasks import load_tasks

    tasks = load_tasks("builtin:tasks", split="train")
    step = max(1, len(tasks) // count)
    return [encode_prompt(tok, [{"role": "user", "content": t.prompt}]) for t in tasks[::step]][
        :count
    ]


def ours(model, tok, prompts: list[list[int]], n: int, new: int) -> float:
    """Seconds for one generate_batch of every prompt's n samples (after a warm-up)."""
    longest = max(len(p) for p in prompts)
    engine = Engine(model, tok, max_seqs=len(prompts) * n, max_len=longest + new)
    params = SamplingParams(temperature=1.0, seed=0)
    engine.generate_batch(prompts[:2], 2, params, 4, stop_token_ids=())  # warm-up
    t0 = time.perf_counter()
    rollouts = engine.generate_batch(prompts, n, params, new, stop_token_ids=())
    seconds = time.perf_counter() - t0
    assert len(rollouts) == len(prompts) * n and all(len(r.tokens) == new for r in rollouts)
    return seconds


def transformers_generate(hf_dir: Path, prompts: list[list[int]], n: int, new: int, pad: int):
    """Seconds for transformers' generate of the B*n repeated, left-padded prompts, and
    for generate + the forward pass that gives the samples' log-probs."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    rows = [p for p in prompts for _ in range(n)]  # TRL repeats each prompt n times
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r)
        mask[i, L - len(r) :] = 1
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
              min_new_tokens=new, pad_token_id=pad)  # fmt: skip
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, -8:], attention_mask=mask[:2, -8:], **kw | {
            "max_new_tokens": 4, "min_new_tokens": 4})  # fmt: skip
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        t_gen = time.perf_counter() - t0
        assert out.shape == (len(rows), L + new)
        full_mask = torch.cat([mask, torch.ones(len(rows), new, dtype=torch.long)], dim=1)
        t0 = time.perf_counter()
        logits = model(input_ids=out, attention_mask=full_mask).logits[:, L - 1 : -1]
        torch.log_softmax(logits.float(), -1).gather(-1, out[:, L:, None])
        t_logp = time.perf_counter() - t0
    return t_gen, t_gen + t_logp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a language-model run directory (e.g. runs/sft)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per sample")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe())
    import transformers

    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    model, tok, _ = load_model_dir(args.run, "cpu")
    model.eval()
    prompts = task_prompts(tok, args.prompts)
    B, n, new = len(prompts), args.n, args.max_tokens
    tokens = B * n * new
    print(f"model: {args.run}, {model.num_params() / 1e6:.2f}M params; {B} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {n} samples x "
          f"{new} new tokens = {tokens} tokens")  # fmt: skip
    t_ours = ours(model, tok, prompts, n, new)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        export_hf(args.run, hf_dir)
        t_hf, t_hf_logp = transformers_generate(hf_dir, prompts, n, new, tok.pad_id)
    print(f"glassbox Engine.generate_batch (with log-probs): {t_ours:7.2f} s "
          f"{tokens / t_ours:8.0f} tokens/s")  # fmt: skip
    print(f"transformers generate:                        {t_hf:7.2f} s "
          f"{tokens / t_hf:8.0f} tokens/s")  # fmt: skip
    print(f"transformers generate + log-prob pass:        {t_hf_logp:7.2f} s "
          f"{tokens / t_hf_logp:8.0f} tokens/s")  # fmt: skip
    print(f"ratio (ours vs generate): {t_hf / t_ours:.2f}x; vs generate + log-probs: "
          f"{t_hf_logp / t_ours:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
