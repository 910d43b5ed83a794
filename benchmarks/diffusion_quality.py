"""Quality after the default training: prompt accuracy and Frechet distance, shapes and digits.

Runs exactly the user-facing commands, one after the other (never in parallel):

    glassbox diffuse train --data builtin:shapes --out runs/shapes
    glassbox diffuse eval runs/shapes
    glassbox diffuse train --data builtin:digits --out runs/digits
    glassbox diffuse eval runs/digits

then prints, per data set, the training wall time, the accuracy at guidance 3 with 50
DDIM steps (targets: shape+colour >= 90%, digit >= 95%) and the eval table.
Extra arguments after ``--eval-args`` are passed to eval (e.g. a smaller table).

    nice -n 10 .venv/bin/python benchmarks/diffusion_quality.py --runs runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

TARGETS = {"shapes": ("shape+colour", 0.90), "digits": ("digit", 0.95)}


def sh(args: list[str]) -> float:
    print("$ glassbox " + shlex.join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "glassbox.cli", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs", help="parent folder of the run directories")
    ap.add_argument("--data", default="shapes,digits")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing runs only")
    ap.add_argument("--eval-args", nargs=argparse.REMAINDER, default=[])
    args = ap.parse_args()
    print(describe(), flush=True)

    summary = []
    for name in args.data.split(","):
        run = Path(args.runs) / name
        train_s = None
        if not args.skip_train:
            train_s = sh(["diffuse", "train", "--data", f"builtin:{name}", "--out", str(run)])
        sh(["diffuse", "eval", str(run), *args.eval_args])
        res = json.loads((run / "eval" / "results.json").read_text())
        key, target = TARGETS[name]
        cell = next(
            (r for r in res["rows"] if r["sampler"] == "ddim" and r["steps"] == 50
             and r["guidance"] == 3),
            None,
        )  # fmt: skip
        acc = cell["accuracy"][key] if cell else float("nan")
        summary.append((name, train_s, key, acc, target))
        print((run / "eval" / "results.md").read_text())
    print("| data | train wall s | metric (ddim 50, guidance 3) | accuracy | target | met |")
    print("|---|---|---|---|---|---|")
    for name, train_s, key, acc, target in summary:
        ts = f"{train_s:.0f}" if train_s else "-"
        print(f"| {name} | {ts} | {key} | {acc:.1%} | {target:.0%} | {acc >= target} |")
    worst = min(acc - target for _, _, _, acc, target in summary)
    print(f"worst margin over target (accuracy - target): {worst:+.1%}")


if __name__ == "__main__":
    main()
