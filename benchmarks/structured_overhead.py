"""Cost of JSON-schema constrained decoding: tokens/s with and without the grammar mask,
same model (GPT-2-124M shape, random weights), same prompts, batch 1, in the engine.

Only decode steps are timed (the prefill step is excluded), so the figure is the
per-token cost: forward pass + sampling (+ llguidance mask and token commit). The
schema allows long outputs (an array of strings) so both runs decode --new tokens.

    nice -n 10 .venv/bin/python benchmarks/structured_overhead.py [--new 48 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_single import build_checkpoint  # noqa: E402
from machine import describe  # noqa: E402

from glassbox import checkpoint  # noqa: E402
from glassbox.infer.engine import Engine, GenerationRequest  # noqa: E402
from glassbox.infer.sampling import SamplingParams  # noqa: E402
from glassbox.infer.structured import Constraint, GrammarCompiler  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
}


def decode_rate(engine: Engine, req: GenerationRequest) -> tuple[float, int, str]:
    """Tokens/s over the decode steps of one request (prefill step excluded)."""
    (seq,) = engine.add(req)
    engine.step()  # prefill + first token
    t = time.perf_counter()
    while engine.has_work:
        engine.step()
    dt = time.perf_counter() - t
    return (len(seq.output) - 1) / dt, len(seq.output), seq.finish_reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="gpt2-124m")
    args = ap.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "run", args.preset)
        model, tok, _ = checkpoint.load_model_dir(run)
    engine = Engine(model, tok, max_seqs=1, max_len=args.prompt + args.new + 1)
    compiler = GrammarCompiler(tok, model.cfg.vocab_size, [tok.end_id, tok.eot_id])
    t = time.perf_counter()
    grammar = compiler.compile(Constraint("json_schema", SCHEMA))
    compile_ms = (time.perf_counter() - t) * 1e3
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tok.vocab_size, (args.prompt,), generator=g).tolist()
    stop = frozenset({tok.end_id, tok.eot_id})

    def request(constrained: bool, seed: int) -> GenerationRequest:
        return GenerationRequest(
            list(prompt), SamplingParams(temperature=1.0, seed=seed), args.new,
            stop_token_ids=stop, grammar=grammar if constrained else None,
        )  # fmt: skip

    decode_rate(engine, request(True, 0))  # warm-up
    free, constrained, lengths = [], [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine load
        free.append(decode_rate(engine, request(False, r))[0])
        rate, n, _ = decode_rate(engine, request(True, r))
        constrained.append(rate)
        lengths.append(n)
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; model {args.preset}")
    print(f"grammar compile: {compile_ms:.1f} ms (cached per schema); constrained lengths "
          f"{lengths} tokens")  # fmt: skip
    print("| decoding | tokens/s (median) | runs |")
    print("|---|---|---|")
    print(f"| unconstrained | {f:.2f} | {', '.join(f'{x:.2f}' for x in free)} |")
    print(f"| JSON schema | {c:.2f} | {', '.join(f'{x:.2f}' for x in constrained)} |")
    print(f"constrained is {100 * (1 - c / f):.1f}% slower per token than unconstrained")


if __name__ == "__main__":
    main()
