"""Cost of tool-call constrained decoding, and call validity under tool_choice=required.

1. Overhead: tokens/s with and without the ``tool_calls`` grammar (``required``,
   parallel calls, three tools: the Lark grammar with one ``%json`` rule per tool), same
   model (GPT-2-124M shape, random weights), same prompt (the tool definitions rendered
   into the chat template), batch 1, in the engine. Only decode steps are timed (the
   prefill step is excluded), so the figure is the per-token cost: forward pass +
   sampling (+ the llguidance mask and token commit). Parallel calls let the constrained
   run decode --new tokens, as the unconstrained one does.
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

    def request(grammar, seed: int, new: int) -> GenerationRequest:
        return GenerationRequest(
            list(prompt), SamplingParams(temperature=1.0, seed=seed), new,
            stop_token_ids=stop, grammar=grammar, detokenize=False,
        )  # fmt: skip

    decode_rate(engine, request(parallel, 0, args.new))  # warm-up
    free, constrained, lengths = [], [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine load
        free.append(decode_rate(engine, request(None, r, args.new))[0])
        rate, out = decode_rate(engine, request(parallel, r, args.new))
        constrained.append(rate)
        lengths.append(len(out))
    f, c = statistics.median(free), statistics.median(constrained)

    valid, truncated, calls_seen = 0, 0, 0
    for seed in range(args.calls):
        _, out = decode_rate(engine, request(single, 1000 + seed, args.call_tokens))
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
    print(f"grammar compile: {compile_ms:.1f} ms (cached per tool set); constrained lengths "
          f"{lengths} tokens")  # fmt: skip
    print("| decoding | tokens/s (median) | runs |")
    print("|---|---|---|")
    print(f"| unconstrained | {f:.2f} | {', '.join(f'{x:.2f}' for x in free)} |")
    print(f"| tool calls (required, parallel) | {c:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in constrained)} |")  # fmt: skip
    print(f"constrained is {100 * (1 - c / f):.1f}% slower per token than unconstrained "
          f"(ratio {f / c:.3f}x time per token)")  # fmt: skip
    print(f"call validity under required: {valid}/{args.calls} replies = "
          f"{100 * valid / args.calls:.1f}% (one call each, arguments validated with "
          f"jsonschema; {truncated} cut at max_tokens={args.call_tokens})")  # fmt: skip


if __name__ == "__main__":
    main()
