"""The failure-mode laboratory end to end (issue 11): train a world model, then measure
retrieval and run every probe, writing one summary and the figures.

    python benchmarks/world_lab.py --work /work/bench/lab            # trains, then probes
    python benchmarks/world_lab.py --work /work/bench/lab --no-train # probes existing runs

Training (each a documented CLI command, run in order, skipped when its run exists):
    pretrain  builtin:world (articles of the seen entities), tiny preset
    sft       builtin:world-qa (questions, "I don't know" for unknown entities, RAG rows)
    dpo       builtin:world-agreeable and builtin:world-steadfast (the sycophancy pair)
Then: retrieval recall@k over every seen and news question (BM25, dense, hybrid), and
hallucination (base and SFT), cutoff, needle (4 lengths x 5 depths), paraphrase,
sampling, sycophancy (SFT, agreeable, steadfast). Copies the figures to --figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import describe

STEPS = {"pretrain": 300, "sft": 600, "dpo": 60}


def run(cmd: list[str], log: Path) -> float:
    t = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def train(work: Path) -> dict:
    g = [sys.executable, "-m", "glassbox.cli"]
    plan = {
        "world-base": [*g, "pretrain", "--data", "builtin:world", "--model", "tiny",
                       "--vocab-size", "512", "--context-length", "512",
                       "--max-steps", str(STEPS["pretrain"]), "--eval-interval", "100"],
        "world-sft": [*g, "sft", str(work / "world-base"), "--data", "builtin:world-qa",
                      "--eval-tasks", "none", "--max-steps", str(STEPS["sft"]), "--lr", "1e-3"],
        # --rpo-alpha keeps the chosen replies' likelihood up (without it DPO drives both
        # replies down and the policy stops writing words)
        "world-agreeable": [*g, "dpo", str(work / "world-sft"), "--data",
                            "builtin:world-agreeable", "--max-steps", str(STEPS["dpo"]),
                            "--rpo-alpha", "1.0"],
        "world-steadfast": [*g, "dpo", str(work / "world-sft"), "--data",
                            "builtin:world-steadfast", "--max-steps", str(STEPS["dpo"]),
                            "--rpo-alpha", "1.0"],
    }  # fmt: skip
    seconds = {}
    for name, cmd in plan.items():
        if (work / name / "model.safetensors").is_file():
            print(f"{name}: exists, kept")
            continue
        seconds[name] = run([*cmd, "--out", str(work / name)], work / f"{name}.log")
        print(f"{name}: trained in {seconds[name]:.0f} s")
    return {"seconds": seconds, "commands": {k: " ".join(v[2:]) for k, v in plan.items()}}


def recall(model, tok, k: int = 5) -> dict:
    """recall@k of the question's own article over all seen + news articles."""
    from glassbox.data.world import builtin_world
    from glassbox.rag.chunking import chunk_documents
    from glassbox.rag.index import Embedder, build_index

    world = builtin_world()
    docs = world.documents("seen") + world.documents("news")
    emb = Embedder(model, tok)
    index = build_index(chunk_documents(docs, tok, size=128, overlap=16), emb)
    qs = world.questions("seen") + world.questions("news")
    out = {}
    for mode in ("bm25", "dense", "hybrid"):
        hits = [
            any(
                h.chunk.doc.endswith("/" + q.entity) for h in index.search(q.question, k, mode, emb)
            )
            for q in qs
        ]
        out[mode] = sum(hits) / len(hits)
    return {"k": k, "questions": len(qs), "recall": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/bench/lab"))
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--figures", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(describe())

    from glassbox.checkpoint import load_model_dir
    from glassbox.probes import run_probe

    summary: dict = {"machine": describe()}
    if not args.no_train:
        summary["training"] = train(args.work)
    models = {n: load_model_dir(args.work / n)[:2] for n in
              ("world-base", "world-sft", "world-agreeable", "world-steadfast")}  # fmt: skip
    summary["retrieval"] = recall(*models["world-sft"])
    print("retrieval recall@5:", summary["retrieval"]["recall"])
    plan = [
        ("hallucination", "world-base", {}), ("hallucination", "world-sft", {}),
        ("cutoff", "world-sft", {}),
        ("needle", "world-sft", {"lengths": (0.25, 0.5, 0.75, 1.0)}),
        ("paraphrase", "world-sft", {}), ("sampling", "world-sft", {}),
        ("sycophancy", "world-sft", {}), ("sycophancy", "world-agreeable", {}),
        ("sycophancy", "world-steadfast", {}),
    ]  # fmt: skip
    summary["probes"] = {}
    for probe, run_name, kwargs in plan:
        t = time.time()
        result, figure = run_probe(probe, *models[run_name], **kwargs)
        path = result.write(args.work / "probes" / run_name, figure)
        summary["probes"][f"{probe}/{run_name}"] = result.data | {
            "headline": result.headline,
            "seconds": round(time.time() - t, 1),
        }
        print(f"{probe} {run_name}: {result.headline}")
        args.figures.mkdir(parents=True, exist_ok=True)
        shutil.copy(path.with_suffix(".png"), args.figures / f"probe-{probe}-{run_name}.png")
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.work / 'summary.json'}")


if __name__ == "__main__":
    main()
