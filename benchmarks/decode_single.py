"""Single-stream decode speed: our engine vs transformers `generate`, same weights.

A GPT-2-124M-shape model (random weights) is saved as a glassbox checkpoint, exported
with `glassbox export --format hf` and loaded in transformers. Each continues a
128-token prompt by 128 greedy tokens, batch 1; the time includes the prefill. Glassbox
runs in the precision `--dtype` picks (auto: measured on this machine, as `glassbox
generate/serve` do) and in fp32; transformers in fp32 and in glassbox's chosen half
precision, all interleaved in one process. The memory-bandwidth ceiling is measured in
the same run: matrix-vector bandwidth at the chosen precision (8 distinct 4096x4096
matrices, so they stream from memory) / bytes of weights read per token.

    nice -n 10 .venv/bin/python benchmarks/decode_single.py [--repeats 3] [--dtype auto]
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


def matvec_bandwidth(dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Effective GB/s of 4096x4096 matrix-vector products in ``dtype``, cycling through 8
    distinct matrices (256-512 MB) so the weights stream from memory, not cache."""
    Ws = torch.randn(8, 4096, 4096).to(dtype)
    v = torch.randn(1, 4096).to(dtype)
    for W in Ws:  # warm-up
        torch.nn.functional.linear(v, W)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for W in Ws:
            torch.nn.functional.linear(v, W)
        times.append(time.perf_counter() - t)
    return Ws.numel() * Ws.element_size() / statistics.median(times) / 1e9


def copy_bandwidth(repeats: int = 5) -> float:
    """GB/s (read + written) of copying a 256 MB tensor: the plain memory ceiling."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


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
    ap.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 for glassbox")
    args = ap.parse_args()
    print(describe(), flush=True)
    from transformers import AutoModelForCausalLM

    from glassbox.infer.precision import cast_model, choose_dtype
    from glassbox.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "run", args.preset)
        export_hf(run, Path(tmp) / "hf")
        model, tok, _ = checkpoint.load_model_dir(run)
        t = time.perf_counter()
        choice = choose_dtype(model, tok, args.dtype)  # prints its one-line decision
        decide_s = time.perf_counter() - t
        fast = cast_model(checkpoint.load_model_dir(run)[0], choice)
        hf = {"fp32": AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32)}
        if choice.name != "fp32":
            hf[choice.name] = AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "hf", dtype=choice.dtype
            )
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tok.vocab_size, (PROMPT,), generator=g).tolist()
    runs = {f"glassbox {choice.name} (--dtype {args.dtype})": ("ours", fast)}
    if choice.name != "fp32":
        runs["glassbox fp32"] = ("ours", model)
    runs |= {f"transformers generate {n}": ("hf", m.eval()) for n, m in hf.items()}
    engines = {
        k: Engine(m, None, max_seqs=1, max_len=PROMPT + NEW) if kind == "ours" else m
        for k, (kind, m) in runs.items()
    }

    def once(key: str, ids: list[int]):
        kind = runs[key][0]
        return (ours_tokens_per_s if kind == "ours" else hf_tokens_per_s)(engines[key], ids)

    for key in runs:  # warm-up
        once(key, prompt[:8])
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, list[int]] = {}
    bws, copies = [], []
    for _ in range(args.repeats):  # interleaved, so all see the same machine load
        for key in runs:
            tps, ids = once(key, prompt)
            speeds[key].append(tps)
            outputs[key] = ids
        bws.append(matvec_bandwidth(choice.dtype))
        copies.append(copy_bandwidth())
    med = {k: statistics.median(v) for k, v in speeds.items()}
    bw, cp = statistics.median(bws), statistics.median(copies)
    wb = weight_bytes(fast)
    ceiling = bw * 1e9 / wb
    ours_key = next(iter(runs))
    hf32 = med["transformers generate fp32"]
    ref = outputs["transformers generate fp32"]
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"dtype decision: {choice.line()} [{decide_s:.2f} s]")
    print(f"model: {args.preset}, {model.num_params() / 1e6:.1f}M params, "
          f"{wb / 1e6:.0f} MB {choice.name} weights read per token")  # fmt: skip
    print(f"prompt {PROMPT} tokens, {NEW} new greedy tokens, batch 1, median of {args.repeats}")
    print("| engine | tokens/s | runs | vs transformers fp32 | greedy = transformers fp32 |")
    print("|---|---|---|---|---|")
    for key, v in speeds.items():
        same = sum(a == b for a, b in zip(outputs[key], ref, strict=True))
        print(f"| {key} | {med[key]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
              f"{med[key] / hf32:.2f}x | {same}/{NEW} |")  # fmt: skip
    print(f"measured {choice.name} matvec bandwidth: {bw:.1f} GB/s (tensor copy {cp:.1f} GB/s) "
          f"-> ceiling {ceiling:.1f} tokens/s")  # fmt: skip
    print(f"glassbox {choice.name} at {100 * med[ours_key] / ceiling:.0f}% of the ceiling")
    print(f"speedup vs transformers fp32: {med[ours_key] / hf32:.2f}x")
    if choice.name != "fp32":
        same_half = med[f"transformers generate {choice.name}"]
        print(f"speedup vs transformers {choice.name}: {med[ours_key] / same_half:.2f}x")


if __name__ == "__main__":
    main()
