"""From base model to assistant, measured: every alignment stage with its defaults.

Runs the README's commands in order from one base run and scores each result on the
held-out split of the built-in verifiable tasks (greedy, per family), the way a user
would:

    glassbox sft    BASE --data builtin:tasks         -> sft
    glassbox reward sft  --data builtin:preferences   -> rm (and rm10, rm30 with noisy votes)
    glassbox ppo    sft  --reward rm                  -> ppo
    glassbox dpo    sft  --data builtin:preferences   -> dpo
    glassbox grpo   sft  --tasks builtin:tasks        -> grpo
    glassbox eval   X    --tasks builtin:tasks        for X in base, sft, ppo, dpo, grpo
    glassbox eval   X    --n 10 --k 1 --k 10          code pass@k for sft and grpo

Wall time per stage, held-out accuracy per family and stage, reward-model pairwise
accuracy by noise share, and the final KL of the RL stages are printed as tables and
written to WORK/summary.json. Stages whose output already exists are skipped (rerun
with a fresh --work to redo them).

    nice -n 5 .venv/bin/python benchmarks/alignment_pipeline.py --base runs/base --work /tmp/align
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

GLASSBOX = [sys.executable, "-m", "glassbox.cli"]


def run(args: list[str], log: Path) -> float:
    """Run one glassbox command, its output to ``log``; returns wall seconds."""
    print("$ glassbox " + " ".join(args), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([*GLASSBOX, *args], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {wall:.0f} s; see {log}")
    print(f"  {wall:.0f} s", flush=True)
    return wall


def last_row(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def stage(work: Path, name: str, args: list[str], walls: dict) -> Path:
    out = work / name
    if not (out / "config.json").exists():
        walls[name] = run([*args, "--out", str(out)], work / f"{name}.log")
    return out


def evaluate(work: Path, name: str, run_dir: Path, extra: list[str] | None = None) -> dict:
    report = work / f"eval_{name}.json"
    if not report.exists():
        args = ["eval", str(run_dir), "--tasks", "builtin:tasks", "--split", "heldout"]
        run([*args, *(extra or []), "--out", str(report)], work / f"eval_{name}.log")
    return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="a `glassbox pretrain` run directory")
    ap.add_argument("--work", default="/tmp/glassbox-alignment", help="where runs go")
    ap.add_argument("--skip", action="append", default=[], help="stage to skip (repeatable)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(describe())
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    base = Path(args.base)
    walls: dict[str, float] = {}
    sft = stage(work, "sft", ["sft", str(base), "--data", "builtin:tasks"], walls)
    runs = {"base": base, "sft": sft}
    rm_acc = {}
    for noise in (0.0, 0.1, 0.3):
        if f"rm{int(noise * 100)}" in args.skip:
            continue
        name = "rm" if noise == 0 else f"rm{int(noise * 100)}"
        rm = stage(
            work, name,
            ["reward", str(sft), "--data", "builtin:preferences", "--noise", str(noise)], walls,
        )  # fmt: skip
        rm_acc[noise] = last_row(rm).get("val_accuracy")
    rl = {
        "ppo": ["ppo", str(sft), "--reward", str(work / "rm")],
        "dpo": ["dpo", str(sft), "--data", "builtin:preferences"],
        "grpo": ["grpo", str(sft), "--tasks", "builtin:tasks"],
    }
    for name, cmd in rl.items():
        if name not in args.skip:
            runs[name] = stage(work, name, cmd, walls)
    reports = {name: evaluate(work, name, path) for name, path in runs.items()}
    code = {
        name: evaluate(work, f"{name}_code", runs[name],
                       ["--family", "code", "--n", "10", "--k", "1", "--k", "10",
                        "--temperature", "0.8"])
        for name in ("sft", "grpo") if name in runs
    }  # fmt: skip
    summary = {
        "walls_s": walls,
        "heldout": {
            name: {k: v for k, v in r.items() if k != "samples"} for name, r in reports.items()
        },
        "code_pass_at_k": {
            n: {k: v for k, v in r.items() if k != "samples"} for n, r in code.items()
        },
        "reward_accuracy_by_noise": rm_acc,
        "final": {name: last_row(path) for name, path in runs.items() if name != "base"},
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print_tables(summary)


def without_samples(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "samples"}


def accuracies(report: dict) -> dict[str, float]:
    """family -> accuracy of an eval report, plus "overall"."""
    out = {r["family"]: r["accuracy"] for r in report["families"]}
    return out | {"overall": report["overall"]["accuracy"]}


def print_tables(summary: dict) -> None:
    heldout = {name: accuracies(r) for name, r in summary["heldout"].items()}
    names = list(heldout)
    print("\nheld-out accuracy (greedy) per family")
    print(f"{'family':<12}" + "".join(f"{n:>8}" for n in names))
    for fam in heldout["base"]:
        print(f"{fam:<12}" + "".join(f"{heldout[n].get(fam, float('nan')):8.3f}" for n in names))
    for name, r in summary["code_pass_at_k"].items():
        print(
            f"code {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["overall"]["pass_at"].items())
        )
    print("\nreward model held-out pairwise accuracy by noisy-vote share")
    for noise, acc in summary["reward_accuracy_by_noise"].items():
        print(f"  noise {noise:.0%}: {acc}")
    print("\nwall time per stage (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in summary["walls_s"].items()))  # fmt: skip
    for name in ("ppo", "grpo", "dpo"):
        row = summary["final"].get(name, {})
        if row:
            print(f"{name} final row: " + ", ".join(
                f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))  # fmt: skip


if __name__ == "__main__":
    main()
