"""Own text encoder vs a contrastive run's (frozen) text encoder, at the same step budget.

Runs the user-facing commands for two arms that differ only in ``--text-encoder``:

    glassbox diffuse train --data D --out R/own  --max-steps N --max-minutes 600
    glassbox diffuse train --data D --out R/clip --max-steps N --max-minutes 600 \\
        --text-encoder clip:CLIP_RUN
    glassbox diffuse eval R/ARM --samplers ddim:50 --guidance 3 --num M --out R/ARM/eval_train
    (D = builtin:shapes-holdout, also:) ... --prompts combos --out R/ARM/eval_combos

Step budgets, not minutes, so CPU contention cannot favour one arm. The judge (the
eval classifier) is trained once and copied into every eval folder, so both arms are
scored by the same network. Prints each arm's training time and per-attribute prompt
accuracy, and the ratio clip / own.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/diffusion_clip_text.py \\
        --clip runs/clip --runs runs/clip_text --steps 1200 --num 256 --parallel
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

KEYS = ("shape+colour", "shape", "colour", "size", "position", "all")


def cmd(args: list[str]) -> list[str]:
    print("$ glassbox " + shlex.join(args), flush=True)
    return [sys.executable, "-m", "glassbox.cli", *args]


def train_arms(arms: dict[str, list[str]], parallel: bool) -> None:
    """Train every arm, one after the other or all at once (two cores, one thread each)."""
    if parallel:
        procs = [subprocess.Popen(cmd(a), stdout=subprocess.DEVNULL) for a in arms.values()]
        if any(p.wait() for p in procs):
            raise SystemExit("a training run failed")
    else:
        for a in arms.values():
            subprocess.run(cmd(a), check=True, stdout=subprocess.DEVNULL)


def evaluate(run: Path, name: str, extra: list[str], judge: Path | None, num: int) -> dict:
    """One cell (DDIM 50, guidance 3); returns that row of results.json."""
    out = run / f"eval_{name}"
    if judge is not None:  # the same classifier for every arm and prompt set
        out.mkdir(parents=True, exist_ok=True)
        for f in ("classifier.safetensors", "classifier.json"):
            shutil.copy(judge / f, out / f)
    args = ["diffuse", "eval", str(run), "--samplers", "ddim:50", "--guidance", "3",
            "--num", str(num), "--out", str(out), *extra]  # fmt: skip
    subprocess.run(cmd(args), check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["rows"][1]


def training_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "train_loss" in r]
    last = steps[-1]
    tail = steps[-8:]
    return {"steps": last["step"], "wall_s": last["wall_s"],
            "loss": sum(r["train_loss"] for r in tail) / len(tail)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", required=True, help="a `glassbox clip train` run directory")
    ap.add_argument("--runs", default="runs/clip_text", help="parent folder of the two arms")
    ap.add_argument("--data", default="builtin:shapes")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps, both arms")
    ap.add_argument("--seed", type=int, default=0, help="training seed, both arms")
    ap.add_argument("--clip-args", default="", help="more train flags for the clip arm only")
    ap.add_argument("--num", type=int, default=256, help="generated images per prompt set")
    ap.add_argument("--parallel", action="store_true", help="train both arms at once")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing runs only")
    ap.add_argument("--judge", help="an eval folder whose classifier.* to reuse (default: train)")
    args = ap.parse_args()
    print(describe(), flush=True)

    root = Path(args.runs)
    base = ["diffuse", "train", "--data", args.data, "--max-steps", str(args.steps),
            "--max-minutes", "600", "--seed", str(args.seed)]  # fmt: skip
    arms = {
        "own": [*base, "--out", str(root / "own")],
        "clip": [
            *base,
            "--out",
            str(root / "clip"),
            "--text-encoder",
            f"clip:{args.clip}",
            *shlex.split(args.clip_args),
        ],  # fmt: skip
    }
    if not args.skip_train:
        train_arms(arms, args.parallel)

    sets = {"train": []} | ({"combos": ["--prompts", "combos"]} if "holdout" in args.data else {})
    results: dict[tuple[str, str], dict] = {}
    judge = Path(args.judge) if args.judge else None
    for arm in arms:
        for name, extra in sets.items():
            results[arm, name] = evaluate(root / arm, name, extra, judge, args.num)
            judge = judge or root / arm / f"eval_{name}"
    train = {arm: training_summary(root / arm) for arm in arms}

    print(f"\ndata {args.data}, {args.steps} steps each, seed {args.seed}, DDIM 50, guidance 3, "
          f"{args.num} images per prompt set, one judge\n")  # fmt: skip
    print("| arm | prompts | steps | train wall s | final loss | " + " | ".join(KEYS) + " | FD |")
    print("|---|---|---|---|---|" + "---|" * (len(KEYS) + 1))
    for (arm, name), row in results.items():
        t = train[arm]
        accs = " | ".join(f"{row['accuracy'][k]:.1%}" for k in KEYS)
        print(f"| {arm} | {name} | {t['steps']} | {t['wall_s']:.0f} | {t['loss']:.4f} | "
              f"{accs} | {row['fd']:.2f} |")  # fmt: skip
    for name in sets:
        own, clip = results["own", name], results["clip", name]
        ratios = []
        for k in KEYS:
            a, b = own["accuracy"][k], clip["accuracy"][k]
            ratios.append(f"{k} {b / a:.3f}" if a else f"{k} n/a (own 0)")
        print(f"ratio clip / own, {name} prompts: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
