"""GRPO: reinforcement learning from programmatic rewards, with no critic.

    every step:
      rollout     B prompts x G samples through the engine (model in eval mode)
      score       each completion by its task's checker (1.0 right / 0.0 wrong; code
                  runs in the sandbox through score_batch)
      advantages  per group of G: reward - group mean (optionally / group std); a group
                  whose samples all scored the same teaches nothing and gets 0
      update      num_iterations times: clipped ratio (epsilon_low, epsilon_high) times
                  the advantage, + beta * KL(policy || reference) (k3), summed over every
                  completion token of the batch / number of those tokens (DAPO)

The reward is the task checkers' verdict and nothing else: no format or length shaping
(the built-in tasks' answers are short and strict, so a right answer is already the
right format; shaping was not needed for the default run to improve).

Old log-probabilities are the rollout's own: the engine returns the raw-logit
log-probabilities of the model that sampled (glassbox.infer.rollout), which is the
policy before this step's first update, so no second forward pass is needed. The
policy is the model at temperature 1: sampling at another ``temperature`` makes the
rollouts slightly off-policy (the ratio still uses the raw log-probs).

With ``beta = 0`` (the default, as in DAPO and Dr. GRPO) no reference model is loaded.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.infer.rollout import Rollout, collate_rollouts
from glassbox.infer.sampling import SamplingParams
from glassbox.train.finetune import (
    RESUME_MAY_CHANGE,
    RolloutConfig,
    completion_text,
    load_start,
    open_stage,
    restore_stage,
    rollout_engine,
    sample_rollouts,
    save_stage,
    train_loop,
)
from glassbox.train.logprobs import entropy, gather_logprobs
from glassbox.train.optim import build_optimizers


@dataclass
class GRPOConfig(RolloutConfig):
    """GRPO settings: the shared fine-tuning knobs + rollouts, rewards and the loss."""

    out: str = "runs/grpo"
    """Run directory to write (must be empty or new unless --resume)."""
    batch_size: int = 16
    """Prompts per rollout batch (each sampled --num-generations times)."""
    grad_accum: int = 1
    """Chunks each update's batch is split into (gradient accumulation: same result,
    less memory)."""
    num_generations: int = 8
    """Samples per prompt (the group whose mean is the baseline); >= 2."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    max_steps: int = 120
    """Optimizer steps (rollout batches); or --max-minutes, whichever ends first."""
    num_iterations: int = 1
    """Policy updates per rollout batch (1 = on-policy: the ratio is 1 at the update)."""
    epsilon_low: float = 0.2
    """The ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float = 0.28
    """The ratio is clipped above at 1 + epsilon_high (DAPO's clip-higher)."""
    beta: float = 0.0
    """KL(policy || reference) coefficient (k3 estimator); 0 = no reference model."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (off = Dr. GRPO's unscaled form)."""
    eval_interval: int = 40
    """Steps between held-out evaluations (and at the end)."""
    checkpoint_interval: int = 40
    """Steps between snapshots (and at the end)."""

    def validate(self) -> None:
        """Range checks, each naming the flag, its value and the valid range."""
        super().validate()
        if self.num_generations < 2:
            raise GlassboxError(
                f"--num-generations={self.num_generations} must be >= 2: GRPO's baseline is the "
                "mean reward of a prompt's samples, so one sample has no baseline."
            )
        if self.max_tokens < 1 or self.num_iterations < 1 or self.max_seqs < 1:
            raise GlassboxError(
                f"--max-tokens={self.max_tokens}, --num-iterations={self.num_iterations} and "
                f"--max-seqs={self.max_seqs} must each be >= 1."
            )
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            raise GlassboxError(
                f"--epsilon-low={self.epsilon_low} must be in [0, 1) and --epsilon-high="
                f"{self.epsilon_high} >= 0."
            )
        if self.beta < 0 or self.eval_limit < 0 or self.score_workers < 1:
            raise GlassboxError(
                f"--beta={self.beta} and --eval-limit={self.eval_limit} must be >= 0, "
                f"--score-workers={self.score_workers} >= 1."
            )
        if not 0 < self.temperature <= 10:
            raise GlassboxError(f"--temperature={self.temperature} must be in (0, 10].")


# --------------------------------------------------------------------------------------
# Advantages and the loss (pure functions, tested by hand)
# --------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages of rewards (B*G,) in prompt-major order -> (B*G,).

    ``reward - mean(group)``, divided by ``std(group) + eps`` when ``scale``. A group
    whose rewards are all equal gets exactly 0 (nothing to prefer)."""
    groups = rewards.view(-1, num_generations)  # (B, G)
    centered = groups - groups.mean(dim=1, keepdim=True)  # (B, G)
    if scale:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.flatten()


def zero_variance_share(rewards: torch.Tensor, num_generations: int) -> float:
    """Share of groups whose samples all scored the same (they contribute nothing)."""
    groups = rewards.view(-1, num_generations)  # (B, G)
    return (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(r) - r - 1`` with
    ``r = ref_logp - logp`` (Schulman's k3: unbiased, always >= 0)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def token_level_loss(
    logp: torch.Tensor,  # (N, T) current policy, per completion token
    old_logp: torch.Tensor,  # (N, T) the rollout's
    advantages: torch.Tensor,  # (N,) one per sequence
    mask: torch.Tensor,  # (N, T) bool, completion tokens
    epsilon_low: float,
    epsilon_high: float,
    n_tokens: int,
    kl: torch.Tensor | None = None,  # (N, T) per-token KL, or None
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO's token-level clipped surrogate: the sum over every completion token of
    ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl``,
    divided by ``n_tokens`` (all completion tokens of the whole rollout batch, so a
    chunked batch adds up to the same loss). Returns (loss, number of clipped tokens)."""
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None]  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (N, T)
    if kl is not None and beta > 0:
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / max(n_tokens, 1)
    n_clipped = ((clipped < unclipped) & mask).sum()
    return loss, n_clipped


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def check_completions(tasks: list, texts: list[str], workers: int = 2) -> list[float]:
    """``score_batch(tasks, texts)``, faster: each distinct (task, completion) is checked
    once (a group's samples often repeat), and a sandboxed completion whose program does
    not even compile scores 0 without starting a sandbox (it could never pass: the
    program must run to its last line). ``compile`` parses, it runs nothing."""
    from glassbox.tasks import score_batch
    from glassbox.tasks.base import SANDBOXED

    verdict: dict[tuple[str, str], float] = {}
    todo: dict[tuple[str, str], object] = {}
    for task, text in zip(tasks, texts, strict=True):
        key = (task.id, text)
        if key in verdict or key in todo:
            continue
        if task.checker in SANDBOXED:
            try:
                compile(task.program(text)[0], "<completion>", "exec")
            except (SyntaxError, ValueError):
                verdict[key] = 0.0
                continue
        todo[key] = task
    keys = list(todo)
    scores = score_batch([todo[k] for k in keys], [k[1] for k in keys], workers=workers)
    verdict |= dict(zip(keys, scores, strict=True))
    return [verdict[(t.id, x)] for t, x in zip(tasks, texts, strict=True)]


def fitting_prompts(
    tokenizer, tasks: list, context_length: int, max_tokens: int, spec: str
) -> tuple[list, list[list[int]]]:
    """The tasks whose prompt + ``max_tokens`` fit the context, and their prompt ids."""
    from glassbox.tasks.evaluate import prompt_ids  # the ids evaluation uses, too

    kept, ids = [], []
    for task in tasks:
        p = prompt_ids(tokenizer, task)
        if len(p) + max_tokens <= context_length:
            kept.append(task)
            ids.append(p)
    if not kept:
        raise GlassboxError(
            f"No prompt of --tasks={spec} fits the model's context of {context_length} tokens "
            f"with --max-tokens={max_tokens}; lower --max-tokens or use shorter tasks."
        )
    return kept, ids


def run(cfg: GRPOConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train with GRPO from ``cfg.base``; returns the last metrics row."""
    from glassbox.tasks import load_tasks

    run_, device = open_stage(cfg, "grpo", explicit, RESUME_MAY_CHANGE)
    cfg = run_.cfg
    model, tok, _ = load_start(cfg.base, device)
    reference = None
    if cfg.beta > 0:  # a frozen copy of the starting policy
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    tasks = load_tasks(cfg.tasks, split="train")
    if not tasks:
        raise GlassboxError(f"--tasks={cfg.tasks} has no train tasks; give a source with some.")
    ctx = model.cfg.context_length
    tasks, prompts_all = fitting_prompts(tok, tasks, ctx, cfg.max_tokens, cfg.tasks)
    optimizers = build_optimizers(
        model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if run_.snapshot is not None:
        step, _ = restore_stage(run_, model, optimizers, gen)
    engine = rollout_engine(model, tok, cfg)  # built once, reused every step
    G = cfg.num_generations
    params_ = [p for p in model.parameters() if p.requires_grad]

    def rollout() -> tuple[list, list[Rollout], float]:
        """Draw the step's prompts and sample G completions of each (seeded from ``gen``,
        so a resumed run draws the same ones)."""
        picks = torch.randint(len(tasks), (cfg.batch_size,), generator=gen).tolist()
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        batch_tasks = [tasks[i] for i in picks]
        prompts = [prompts_all[i] for i in picks]
        params = SamplingParams(temperature=cfg.temperature, seed=seed)
        t0 = time.perf_counter()
        rollouts = sample_rollouts(engine, prompts, G, params, cfg.max_tokens)
        return batch_tasks, rollouts, time.perf_counter() - t0

    def score(batch_tasks: list, rollouts: list[Rollout]) -> torch.Tensor:
        """The checkers' verdicts, one per rollout (B*G,)."""
        group_tasks = [batch_tasks[r.prompt_index] for r in rollouts]
        texts = [completion_text(tok, r) for r in rollouts]
        return torch.tensor(check_completions(group_tasks, texts, cfg.score_workers))

    def update(rollouts: list[Rollout], advantages: torch.Tensor) -> dict[str, float]:
        """num_iterations passes of the token-level loss over the batch (in grad_accum
        chunks); returns the last pass's loss, clip fraction, entropy and KL."""
        batch = collate_rollouts(rollouts, pad_id=0, device=device)
        mask = batch.completion_mask[:, 1:]  # (N, L-1): positions that score a completion token
        old_logp = batch.logprobs[:, 1:]  # (N, L-1)
        n_tokens = int(mask.sum())
        ref_logp = None
        if reference is not None:
            with torch.no_grad(), autocast(device):
                ref_logp = gather_logprobs(reference(batch.input_ids), batch.input_ids)
        chunks = torch.arange(len(rollouts)).chunk(cfg.grad_accum)
        stats: dict[str, float] = {}
        for _ in range(cfg.num_iterations):
            totals = {"loss": 0.0, "clipped": 0.0, "entropy": 0.0, "kl": 0.0}
            for idx in chunks:
                ids, m = batch.input_ids[idx], mask[idx]
                with autocast(device):
                    logits = model(ids)  # (n, L, V)
                logp = gather_logprobs(logits, ids)  # (n, L-1)
                kl = None if ref_logp is None else k3_kl(logp, ref_logp[idx])
                loss, n_clipped = token_level_loss(
                    logp, old_logp[idx], advantages[idx].to(device), m,
                    cfg.epsilon_low, cfg.epsilon_high, n_tokens, kl, cfg.beta,
                )  # fmt: skip
                loss.backward()
                with torch.no_grad():
                    totals["loss"] += loss.item()
                    totals["clipped"] += float(n_clipped)
                    totals["entropy"] += float((entropy(logits) * m).sum())
                    if kl is not None:
                        totals["kl"] += float((kl * m).sum())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params_, cfg.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            stats = {
                "loss": totals["loss"],
                "clip_frac": totals["clipped"] / max(n_tokens, 1),
                "entropy": totals["entropy"] / max(n_tokens, 1),
            }
            if reference is not None:
                stats["kl"] = totals["kl"] / max(n_tokens, 1)
        return stats

    def one_step(step: int) -> dict[str, float]:
        batch_tasks, rollouts, rollout_s = rollout()
        rewards = score(batch_tasks, rollouts)  # (B*G,)
        advantages = group_advantages(rewards, G, cfg.scale_rewards)  # (B*G,)
        stats = update(rollouts, advantages)
        n_gen = sum(len(r.tokens) for r in rollouts)
        row = {
            "reward": rewards.mean().item(),
            **stats,
            "response_len": n_gen / len(rollouts),
            "zero_var_groups": zero_variance_share(rewards, G),
            "rollout_tokens_per_s": n_gen / max(rollout_s, 1e-9),
            "tokens": n_gen,
        }
        return row | family_accuracy(batch_tasks, rollouts, rewards)

    def evaluate_heldout() -> dict[str, float]:
        return heldout_accuracy(model, tok, cfg.tasks, cfg.eval_limit, cfg.max_tokens)

    def save(step: int) -> None:
        save_stage(run_, step, model, tok, optimizers, gen)

    if run_.snapshot is None and cfg.eval_limit > 0:  # the starting point, for comparison
        with run_.clock.paused():
            run_.log({"step": 0} | evaluate_heldout())
    plot = ("loss", "reward", "heldout_accuracy")
    return train_loop(run_, step, optimizers, one_step, save, evaluate_heldout, plot, "GRPO")


def family_accuracy(
    batch_tasks: list, rollouts: list[Rollout], rewards: torch.Tensor
) -> dict[str, float]:
    """Train accuracy per task family on this batch's rollouts: ``acc_<family>``."""
    sums: dict[str, list[float]] = {}
    for r, value in zip(rollouts, rewards.tolist(), strict=True):
        sums.setdefault(batch_tasks[r.prompt_index].family, []).append(value)
    return {f"acc_{f}": sum(v) / len(v) for f, v in sorted(sums.items())}


def heldout_accuracy(
    model: torch.nn.Module, tokenizer, spec: str, limit: int, max_tokens: int
) -> dict[str, float]:
    """Greedy accuracy on the first ``limit`` held-out tasks of each family, through
    glassbox.tasks.evaluate: ``heldout_accuracy`` and ``heldout_<family>``."""
    if limit == 0:
        return {}
    from glassbox.tasks import load_tasks
    from glassbox.tasks.evaluate import evaluate, limit_per_family

    chosen = limit_per_family(load_tasks(spec, split="heldout"), limit)
    if not chosen:
        return {}
    model.eval()
    try:
        report = evaluate(model, tokenizer, chosen, max_tokens=max_tokens, max_seqs=64,
                          show_progress=False)  # fmt: skip
    finally:
        model.train()
    return eval_row(report)


def eval_row(report) -> dict[str, float]:
    """The metrics-row entries of an EvalReport: ``heldout_<family>`` greedy accuracy and
    ``heldout_accuracy``, their mean over families."""
    fams = {r.family: float(r.accuracy) for r in report.rows}
    mean = sum(fams.values()) / max(len(fams), 1)
    return {f"heldout_{f}": v for f, v in fams.items()} | {"heldout_accuracy": mean}
