"""Single-stream decode speed: our engine vs transformers `generate`, same weights.

A GPT-2-124M-shape model (random weights) is saved as a glassbox checkpoint, exported
with `glassbox export --format hf` and loaded in transformers. Both continue a 128-token
prompt by 128 greedy tokens, batch 1, fp32 (bf16 is unusable on this CPU kind); the
time includes the prefill. The memory-bandwidth ceiling is measured in the same run:
fp32 matrix-vector bandwidth / bytes of weights read per token.

    nice -n 10 .venv/bin/python benchmarks/decode_single.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from glassbox import checkpoint
from glassbox.config import ModelConfig
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

PROMPT, NEW = 128, 128


def build_checkpoint(out: Path, preset: str = "gpt2-124m") -> Path:
    """A random-weight model of the preset's shape, with a small real tokenizer."""
    text = [Path(torch.__file__).read_text()[:200_000]]
    tok = Tokenizer.train(text, vocab_size=1024, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset)).eval()
    checkpoint.save_model_dir(out, model, tok, "random")
    return out


def matvec_bandwidth(repeats: int = 20) -> float:
    """Effective GB/s of an fp32 4096x4096 matrix-vector product (weights streamed)."""
    W, v = torch.randn(4096, 4096), torch.randn(4096)
    for _ in range(3):
        torch.mv(W, v)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(W, v)
        times.append(time.perf_counter() - t)
    return W.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: Transformer) -> int:
    """Bytes read per decoded token: every matrix once (the tied embedding as LM head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ours_tokens_per_s(engine: Engine, prompt: list[int]) -> float:
    req = GenerationRequest(list(prompt), SamplingParams(temperature=0.0), NEW)
    t = time.perf_counter()
    out = engine.run([req])[0][0]
    dt = time.perf_counter() - t
    assert len(out) == NEW
    return NEW / dt, out


def hf_tokens_per_s(hf_model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    dt = time.perf_counter() - t
    assert out.shape[1] == len(prompt) + NEW
    return NEW / dt, out[0, len(prompt) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="gpt2-124m")
    args = ap.parse_args()
    print(describe(), flush=True)
    from transformers import AutoModelForCausalLM

    from glassbox.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "run", args.preset)
        export_hf(run, Path(tmp) / "hf")
        model, tok, _ = checkpoint.load_model_dir(run)
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tok.vocab_size, (PROMPT,), generator=g).tolist()
    engine = Engine(model, None, max_seqs=1, max_len=PROMPT + NEW)
    ours_tokens_per_s(engine, prompt[:8])  # warm-up
    hf_tokens_per_s(hf, prompt[:8])
    ours, theirs, bws, same = [], [], [], True
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        o, o_ids = ours_tokens_per_s(engine, prompt)
        h, h_ids = hf_tokens_per_s(hf, prompt)
        ours.append(o)
        theirs.append(h)
        bws.append(matvec_bandwidth())
        same &= o_ids == h_ids
    o, h, bw = statistics.median(ours), statistics.median(theirs), statistics.median(bws)
    wb = weight_bytes(model)
    ceiling = bw * 1e9 / wb
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"model: {args.preset}, {model.num_params() / 1e6:.1f}M params, "
          f"{wb / 1e6:.0f} MB fp32 weights read per token")  # fmt: skip
    print(f"prompt {PROMPT} tokens, {NEW} new greedy tokens, batch 1, median of {args.repeats}")
    print(f"greedy tokens identical to transformers: {same}")
    print("| engine | tokens/s | runs |")
    print("|---|---|---|")
    print(f"| glassbox Engine | {o:.1f} | {', '.join(f'{x:.1f}' for x in ours)} |")
    print(f"| transformers generate | {h:.1f} | {', '.join(f'{x:.1f}' for x in theirs)} |")
    print(f"measured fp32 matvec bandwidth: {bw:.1f} GB/s -> ceiling {ceiling:.1f} tokens/s")
    print(f"glassbox at {100 * o / ceiling:.0f}% of the bandwidth ceiling")
    print(f"speedup vs transformers: {o / h:.2f}x")


if __name__ == "__main__":
    main()
