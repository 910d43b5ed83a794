"""Speculative decoding vs plain decoding of the same target, side by side.

The target and the draft are trained runs that share a tokenizer, e.g. (the draft
first, the target reusing its tokenizer):

    glassbox pretrain --out /work/bench/tiny --model tiny --max-minutes 3
    glassbox pretrain --out /work/bench/small --model small \
        --tokenizer /work/bench/tiny/tokenizer.json --max-minutes 6
    python benchmarks/speculative.py --target /work/bench/small --draft /work/bench/tiny

Without --draft only prompt lookup is compared with plain decoding.

For each prompt (code, like the default corpus) and each mode, one after the other:
plain decoding through the Engine (one slot), speculative with the draft model (if
given), and speculative with prompt lookup. Greedy runs must give identical tokens
(checked); sampled runs (temperature 1) follow the target's distribution, not the
same tokens. Reported: acceptance rate, tokens per target forward, tokens/s, and the
speedup over plain decoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

from glassbox.checkpoint import load_model_dir  # noqa: E402
from glassbox.infer.engine import Engine, GenerationRequest  # noqa: E402
from glassbox.infer.sampling import SamplingParams  # noqa: E402
from glassbox.infer.speculative import SpeculativeDecoder, check_same_tokenizer  # noqa: E402

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    ",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    '    def get(self, key, default=None):\n        """Return the value for key."""\n',
    "for i in range(len(items)):\n    if items[i] is None:\n        ",
]


def plain(engine: Engine, prompt: list[int], params: SamplingParams, n: int):
    t = time.perf_counter()
    out = engine.run([GenerationRequest(prompt, params, n)])[0][0]
    return out, time.perf_counter() - t


def speculative(dec: SpeculativeDecoder, prompt: list[int], params: SamplingParams, n: int):
    t = time.perf_counter()
    out = list(dec.generate(prompt, params, n))
    return out, time.perf_counter() - t, dec.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", default=None, help="omit: prompt lookup only")
    ap.add_argument("--new", type=int, default=96, help="tokens per prompt")
    ap.add_argument("--k", type=int, default=4, help="proposals per round")
    ap.add_argument("--lookup", type=int, default=3, help="prompt-lookup n-gram")
    args = ap.parse_args()
    print(describe(), flush=True)
    target, tok, _ = load_model_dir(args.target, torch.device("cpu"))
    modes: dict[str, SpeculativeDecoder] = {}
    about = f"target {args.target}: {target.num_params() / 1e6:.2f}M params"
    if args.draft:
        draft, dtok, _ = load_model_dir(args.draft, torch.device("cpu"))
        check_same_tokenizer(tok, dtok, args.target, args.draft)
        modes[f"draft {Path(args.draft).name}"] = SpeculativeDecoder(
            target, tok, draft=draft, k=args.k
        )
        about += f"; draft {args.draft}: {draft.num_params() / 1e6:.2f}M params"
    modes[f"prompt lookup (n={args.lookup})"] = SpeculativeDecoder(
        target, tok, prompt_lookup=args.lookup, k=args.k
    )
    print(
        f"{about}; k={args.k}, {args.new} new tokens per prompt, {len(PROMPTS)} prompts, "
        f"fp32, {torch.get_num_threads()} threads"
    )
    engine = Engine(target, tok, max_seqs=1)
    warm = [tok.eot_id, *tok.encode(PROMPTS[0])]
    plain(engine, warm, SamplingParams(temperature=0.0), 8)
    for dec in modes.values():
        speculative(dec, warm, SamplingParams(temperature=0.0), 8)
    print("| sampling | mode | acceptance | tokens / target pass | tok/s | speedup |")
    print("|---|---|---|---|---|---|")
    for label, params in (("greedy", 0.0), ("temperature 1", 1.0)):
        totals = {"plain": [0, 0.0]} | {m: [0, 0.0, 0, 0, 0] for m in modes}
        for i, text in enumerate(PROMPTS):
            prompt = [tok.eot_id, *tok.encode(text)]
            sp = SamplingParams(temperature=params, seed=i if params else None)
            ref, secs = plain(engine, prompt, sp, args.new)
            totals["plain"][0] += len(ref)
            totals["plain"][1] += secs
            for name, dec in modes.items():
                out, secs, st = speculative(dec, prompt, sp, args.new)
                if params == 0.0 and out != ref[: len(out)]:
                    raise SystemExit(f"{name}: greedy tokens differ from plain decoding")
                t = totals[name]
                t[0], t[1] = t[0] + len(out), t[1] + secs
                t[2], t[3], t[4] = t[2] + st.proposed, t[3] + st.accepted, t[4] + st.rounds
        base = totals["plain"][0] / totals["plain"][1]
        print(f"| {label} | plain decode (Engine) | - | 1.00 | {base:.1f} | 1.00x |")
        for name in modes:
            n, secs, proposed, accepted, rounds = totals[name]
            rate = accepted / proposed if proposed else 0.0
            tps = n / secs
            print(
                f"| {label} | speculative, {name} | {rate:.1%} | {n / rounds:.2f} | {tps:.1f} | "
                f"{tps / base:.2f}x |"
            )
    print("greedy: speculative tokens identical to plain decoding (checked per prompt)")


if __name__ == "__main__":
    main()
