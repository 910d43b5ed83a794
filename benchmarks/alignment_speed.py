"""Time per optimizer step of our SFT, reward and DPO steps vs TRL's trainers, same batch.

One model (the --model preset shape with random weights, or --base) is exported with
`glassbox export --format hf` and loaded in transformers as LlamaForCausalLM (SFT, DPO)
and LlamaForSequenceClassification (reward: the same body, a new one-output head).
Each side runs its own optimizer step on the same tokens, fp32, AdamW, clipping at 1.0:

    SFT     ours: sft_loss on a packed batch (segment ids)  TRL: SFTTrainer.training_step
            on the same rows (position_ids restart per conversation, labels -100 off the
            assistant tokens)
    reward  ours: RewardModel + Bradley-Terry               TRL: RewardTrainer.training_step
    DPO     ours: policy + frozen reference per batch       TRL: DPOTrainer.training_step
                                                                 (reference per batch too)

TRL's step is its trainer's ``training_step`` (forward, its loss and metrics, backward)
plus the same clip and ``optimizer.step()``; data loading is outside both timings. The
table gives the median milliseconds per step over --steps timed steps after --warmup,
steps of the two sides interleaved, and ours / TRL (target: <= 0.8).

    nice -n 10 .venv/bin/python benchmarks/alignment_speed.py [--model tiny] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glassbox import checkpoint
from glassbox.config import ModelConfig
from glassbox.data.preferences import collate, encode_pair, load_pairs
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

Step = Callable[[], None]


# --------------------------------------------------------------------------------------
# The shared model and batches
# --------------------------------------------------------------------------------------


def build_base(out: Path, preset: str, pairs: list[dict]) -> Path:
    """A random-weight model of ``preset`` with a tokenizer trained on the pairs' text."""
    text = [str(p["prompt"]) + str(p["chosen"]) + str(p["rejected"]) for p in pairs]
    cfg = ModelConfig.from_name(preset)
    tok = Tokenizer.train(text, vocab_size=max(512, min(cfg.vocab_size, 2048)), show_progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=tok.vocab_size))
    checkpoint.save_model_dir(out, model, tok, "random")
    return out


def pair_batch(tok, pairs: list[dict], n: int, max_len: int):
    """The first ``n`` built-in pairs that fit ``max_len``, as one batch."""
    encoded = [encode_pair(tok, p) for p in pairs]
    fitting = [e for e in encoded if len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= max_len]
    return collate(fitting[:n], tok.pad_id)


def sft_batch(tok, n_rows: int, seq_len: int):
    """One packed batch of ``n_rows`` rows of built-in task conversations."""
    from glassbox.tasks import load_tasks, sft_conversations
    from glassbox.train.sft import encode_examples, pack

    convs = sft_conversations([t for t in load_tasks("builtin:tasks", "train") if t.chat])
    examples = encode_examples(tok, convs[: 40 * n_rows], seq_len, "benchmark")
    return pack(examples, seq_len, n_rows)[0]


# --------------------------------------------------------------------------------------
# Our steps
# --------------------------------------------------------------------------------------


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def finish(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Clip, step, clear: the end of every optimizer step on both sides."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def our_sft(base: Path, batch) -> Step:
    from glassbox.train.sft import sft_loss

    model = checkpoint.load_model_dir(base)[0].train()
    opt = adamw(model)

    def step() -> None:
        loss, _ = sft_loss(model, batch)
        loss.backward()
        finish(model, opt)

    return step


def our_reward(base: Path, batch) -> Step:
    from glassbox.train.reward import RewardModel, bradley_terry_loss, pair_rewards

    model = RewardModel.from_language_model(checkpoint.load_model_dir(base)[0]).train()
    opt = adamw(model)

    def step() -> None:
        rc, rr = pair_rewards(model, batch)
        bradley_terry_loss(rc, rr, batch.margin).backward()
        finish(model, opt)

    return step


def our_dpo(base: Path, batch) -> Step:
    from glassbox.train.dpo import DPOConfig, pair_loss

    policy = checkpoint.load_model_dir(base)[0].train()
    reference = checkpoint.load_model_dir(base)[0].eval().requires_grad_(False)
    opt, cfg = adamw(policy), DPOConfig(beta=0.1)

    def step() -> None:
        loss, _ = pair_loss(policy, reference, batch, cfg)
        loss.backward()
        finish(policy, opt)

    return step


# --------------------------------------------------------------------------------------
# TRL's steps
# --------------------------------------------------------------------------------------


def trl_step(trainer, inputs: dict[str, torch.Tensor]) -> Step:
    """The trainer's own training_step on ``inputs``, then clip + its AdamW step."""
    opt = trainer.create_optimizer()
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # what its train loop sets per step

    def step() -> None:
        trainer.training_step(model, dict(inputs))
        finish(model, opt)

    return step


def trl_args(cls, out: Path, **kw):
    return cls(output_dir=str(out), report_to=[], use_cpu=True, learning_rate=1e-5,
               optim="adamw_torch", per_device_train_batch_size=2, **kw)  # fmt: skip


def trl_sft(hf: Path, batch, work: Path) -> Step:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}] * 2  # fmt: skip
    trainer = SFTTrainer(model=model, args=trl_args(SFTConfig, work / "sft"),
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(hf))  # fmt: skip
    labels = torch.full_like(batch.ids, -100)
    labels[:, 1:] = torch.where(batch.mask[:, :-1], batch.ids[:, 1:], -100)
    inputs = {"input_ids": batch.ids, "position_ids": batch.input_pos, "labels": labels}
    return trl_step(trainer, inputs)


def trl_reward(hf: Path, batch, work: Path) -> Step:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1,
                                                               dtype=torch.float32)  # fmt: skip
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2
    trainer = RewardTrainer(model=model, args=trl_args(RewardConfig, work / "rm"),
                            train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(hf))  # fmt: skip
    inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask.long()}
    return trl_step(trainer, inputs)


def trl_dpo(hf: Path, batch, work: Path) -> Step:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2
    trainer = DPOTrainer(model=policy, ref_model=reference, args=trl_args(DPOConfig,
                         work / "dpo", beta=0.1), train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(hf))  # fmt: skip
    inputs = {"input_ids": batch.ids, "attention_mask": batch.attention_mask.long(),
              "completion_mask": batch.completion_mask.long()}  # fmt: skip
    return trl_step(trainer, inputs)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def race(ours: Step, theirs: Step, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per step of each side, steps interleaved after warmup."""
    for _ in range(warmup):
        ours()
        theirs()
    t_ours, t_theirs = [], []
    for _ in range(steps):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="model preset (shape) to time")
    parser.add_argument("--base", default=None, help="a checkpoint instead of random weights")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per batch")
    parser.add_argument("--sft-rows", type=int, default=16, help="packed rows per SFT batch")
    parser.add_argument("--seq-len", type=int, default=256, help="SFT row length / pair cap")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", default="sft,reward,dpo")
    args = parser.parse_args()
    print(describe(), flush=True)
    pairs = load_pairs("builtin:preferences", "train")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = Path(args.base) if args.base else build_base(work / "base", args.model, pairs)
        from glassbox.interop.hf import export_hf

        hf = export_hf(base, work / "hf")
        _, tok, _ = checkpoint.load_model_dir(base)
        preference = pair_batch(tok, pairs, args.pairs, args.seq_len)
        stages = {
            "sft": lambda: (our_sft(base, sb), trl_sft(hf, sb, work)),
            "reward": lambda: (our_reward(base, preference), trl_reward(hf, preference, work)),
            "dpo": lambda: (our_dpo(base, preference), trl_dpo(hf, preference, work)),
        }
        wanted = args.stages.split(",")
        sb = sft_batch(tok, args.sft_rows, args.seq_len) if "sft" in wanted else None
        print(f"model {args.model if not args.base else args.base}; preference batch "
              f"{tuple(preference.ids.shape)} (2 x {args.pairs} pairs), SFT batch "
              f"{tuple(sb.ids.shape) if sb is not None else '-'}; {torch.get_num_threads()} "
              f"threads; median of {args.steps} steps after {args.warmup}")  # fmt: skip
        print(f"{'stage':8} {'ours ms/step':>13} {'TRL ms/step':>12} {'ours/TRL':>9}")
        for name in wanted:
            ours, theirs = stages[name]()
            a, b = race(ours, theirs, args.steps, args.warmup)
            print(f"{name:8} {a * 1e3:13.1f} {b * 1e3:12.1f} {a / b:9.2f}", flush=True)


if __name__ == "__main__":
    main()
