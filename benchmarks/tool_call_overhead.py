"""Cost of tool-call constrained decoding, and call validity under tool_choice=required.

1. Overhead: tokens/s with and without the ``tool_calls`` grammar (``required``,
   parallel calls, three tools: the Lark grammar with one ``%json`` rule per tool), same
   model (GPT-2-124M shape, random weights), same prompt (the tool definitions rendered
   into the chat template), batch 1, in the engine. Only decode steps are timed (the
   prefill step is excluded), so the figure is the per-token cost: forward pass +
   sampling (+ the llguidance mask and token commit). The end tokens are biased away
   (logit_bias -100) and parallel calls are allowed, so every run decodes exactly --new
   tokens. The ``auto`` grammar (text that never writes the call tag, or calls) is
   timed too: a random model writes text under it. On a shared machine the end-to-end
   rates swing more than the grammar costs, so the grammar's own work is also timed
   directly: each constrained output is replayed through a fresh matcher (mask fill,
   unpack, token commit: what the engine adds per step) and compared with the
   unconstrained time per token.
2. Validity: --calls requests at different seeds with ``required`` and one call
   (the grammar ends the reply when the call closes); every call is parsed back and its
   arguments validated against the tool's schema with jsonschema. A reply cut at
   max_tokens before its call closes counts as invalid.

    nice -n 10 .venv/bin/python benchmarks/tool_call_overhead.py [--new 48 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_single import build_checkpoint  # noqa: E402
from machine import describe  # noqa: E402

from glassbox import checkpoint  # noqa: E402
from glassbox.conversation import encode_prompt, parse_tool_calls  # noqa: E402
from glassbox.infer.engine import Engine, GenerationRequest  # noqa: E402
from glassbox.infer.sampling import SamplingParams  # noqa: E402
from glassbox.infer.structured import GrammarCompiler, tool_calls_constraint  # noqa: E402

PARAMS = {
    "search": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60}},
               "required": ["query"]},
    "add": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999,
                                                   "maximum": 999},
                                             "b": {"type": "integer", "minimum": -999,
                                                   "maximum": 999}},
            "required": ["a", "b"]},
    "weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"]},
}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": k, "description": f"The {k} tool.", "parameters": v}}
    for k, v in PARAMS.items()
]
SPECS = [{"name": k, "parameters": v} for k, v in PARAMS.items()]


def decode_rate(engine: Engine, req: GenerationRequest) -> tuple[float, list[int]]:
    """Tokens/s over the decode steps of one request (prefill step excluded)."""
    (seq,) = engine.add(req)
    engine.step()  # prefill + first token
    t = time.perf_counter()
    while engine.has_work:
        engine.step()
    dt = time.perf_counter() - t
    return (len(seq.output) - 1) / max(dt, 1e-9), seq.output


def grammar_ms_per_token(grammar, engine: Engine, req: GenerationRequest) -> float:
    """Median ms of the grammar's work per token over a decoded output, replayed: fill
    the bitmask, unpack it to a vocabulary mask, commit the token."""
    from glassbox.infer.structured import bitmask_words, unpack_bitmask_np

    _, out = decode_rate(engine, req)
    times = []
    for _ in range(5):
        m = grammar.matcher()
        row = torch.zeros(1, bitmask_words(grammar.vocab_size), dtype=torch.int32)
        t = time.perf_counter()
        for token in out:
            m.fill_bitmask(row[0])
            unpack_bitmask_np(row, grammar.vocab_size)
            m.accept(token)
        times.append((time.perf_counter() - t) * 1e3 / max(len(out), 1))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20, help="Requests for the validity check.")
    ap.add_argument("--call-tokens", type=int, default=160, help="max_tokens per call.")
    ap.add_argument("--preset", default="gpt2-124m")
    args = ap.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_checkpoint(Path(tmp) / "run", args.preset)
        model, tok, _ = checkpoint.load_model_dir(run)
    messages = [{"role": "user", "content": "What is the weather in Lyon, and 2 + 3?"}]
    prompt = encode_prompt(tok, messages, TOOLS)
    max_len = len(prompt) + max(args.new, args.call_tokens) + 1
    engine = Engine(model, tok, max_seqs=1, max_len=max_len)
    stop = frozenset({tok.end_id, tok.eot_id})
    compiler = GrammarCompiler(tok, model.cfg.vocab_size, sorted(stop))
    t = time.perf_counter()
    parallel = compiler.compile(tool_calls_constraint(SPECS, "required", parallel=True))
    compile_ms = (time.perf_counter() - t) * 1e3
    single = compiler.compile(tool_calls_constraint(SPECS, "required", parallel=False))
    auto = compiler.compile(tool_calls_constraint(SPECS, "auto", parallel=True))
    no_end = {t: -100.0 for t in stop}

    def request(grammar, seed: int, new: int, bias: bool = True) -> GenerationRequest:
        params = SamplingParams(temperature=1.0, seed=seed, logit_bias=no_end if bias else {})
        return GenerationRequest(list(prompt), params, new, stop_token_ids=stop,
                                 grammar=grammar, detokenize=False)  # fmt: skip

    decode_rate(engine, request(parallel, 0, args.new))  # warm-up
    rates: dict[str, list[float]] = {"free": [], "required": [], "auto": []}
    lengths: set[int] = set()
    for r in range(args.repeats):  # interleaved, so all see the same machine load
        for name, grammar in (("free", None), ("required", parallel), ("auto", auto)):
            rate, out = decode_rate(engine, request(grammar, r, args.new))
            rates[name].append(rate)
            lengths.add(len(out))
    f, c, a = (statistics.median(rates[k]) for k in ("free", "required", "auto"))
    replay = {k: grammar_ms_per_token(g, engine, request(g, 0, args.new))
              for k, g in (("required", parallel), ("auto", auto))}  # fmt: skip

    valid, truncated, calls_seen = 0, 0, 0
    for seed in range(args.calls):
        _, out = decode_rate(engine, request(single, 1000 + seed, args.call_tokens, bias=False))
        _, calls = parse_tool_calls(tok.decode(out), set(PARAMS))
        calls_seen += len(calls)
        if len(out) >= args.call_tokens and not calls:
            truncated += 1
        ok = len(calls) == 1
        for call in calls:
            try:
                jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
            except jsonschema.ValidationError:
                ok = False
        valid += ok

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; model {args.preset}; "
          f"prompt {len(prompt)} tokens (3 tool definitions)")  # fmt: skip
    print(f"grammar compile: {compile_ms:.1f} ms (cached per tool set); decoded lengths "
          f"{sorted(lengths)} tokens")  # fmt: skip
    print("| decoding | tokens/s (median) | runs |")
    print("|---|---|---|")
    for label, key in (("unconstrained", "free"), ("tool calls, required (parallel)", "required"),
                       ("tool calls, auto (text or calls)", "auto")):  # fmt: skip
        runs = ", ".join(f"{x:.2f}" for x in rates[key])
        print(f"| {label} | {statistics.median(rates[key]):.2f} | {runs} |")
    for label, x in (("required", c), ("auto", a)):
        print(f"{label}: {100 * (1 - x / f):.1f}% slower per token than unconstrained "
              f"(time per token ratio {f / x:.3f}x); grammar work replayed: "
              f"{replay[label]:.3f} ms/token = {100 * replay[label] * f / 1e3:.1f}% of the "
              f"unconstrained {1e3 / f:.1f} ms/token")  # fmt: skip
    print(f"call validity under required: {valid}/{args.calls} replies = "
          f"{100 * valid / args.calls:.1f}% (one call each, arguments validated with "
          f"jsonschema; {truncated} cut at max_tokens={args.call_tokens})")  # fmt: skip


if __name__ == "__main__":
    main()
