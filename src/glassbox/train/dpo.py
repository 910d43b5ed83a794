"""Direct preference optimization: a language model learns from pairs, offline.

    pairs (prompt, chosen, rejected) -> 2N right-padded rows (chosen first)
    -> policy log p(completion | prompt), summed over completion tokens: pc, pr (N,)
    -> the frozen reference model, the same rows, no gradient: rc, rr (N,)
    -> h = (pc - rc) - (pr - rr)        how much more the policy prefers chosen than
                                        the reference did
    -> sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
       (eps = label_smoothing: conservative DPO, for votes flipped with chance eps)
       ipo:     (h / tokens - 1 / (2 beta))^2   h from per-token means of the log-ratios
    -> + rpo_alpha * (mean per-token NLL of the chosen answer), optional: plain DPO
       lowers the likelihood of both answers of a pair as long as their gap grows;
       the NLL term (RPO, Pang et al. 2024) keeps the chosen answer likely
    -> AdamW; implicit rewards beta (pc - rc), beta (pr - rr), their accuracy and margin,
       held-out preference accuracy at each evaluation

The reference is the ``--reference`` checkpoint (default: ``--base``, the usual SFT
model), kept frozen in memory; its log-probabilities are computed per batch, in the
same forward shapes as the policy's (no precomputation pass over the whole dataset,
which would cost more than a default run's steps on the 14,000 built-in pairs). The
output is an ordinary language-model checkpoint (stage "dpo").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from glassbox.data.preferences import (
    PairBatch,
    PreferenceDataConfig,
    batches,
    load_preference_sets,
    sample_batch,
)
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.train.finetune import (
    FinetuneConfig,
    load_start,
    open_stage,
    restore_stage,
    save_stage,
    train_loop,
)
from glassbox.train.optim import build_optimizers

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(PreferenceDataConfig, FinetuneConfig):
    """A DPO run: a language model tuned on preference pairs against a frozen reference."""

    out: str = "runs/dpo"
    """Run directory to write (must be empty or new unless --resume)."""
    reference: str | None = None
    """Checkpoint of the frozen reference model; none = the --base checkpoint."""
    beta: float = 0.1
    """Strength of the pull towards the reference (higher = stay closer)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (squared loss on per-token log-ratios)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed share of flipped votes, in [0, 0.5) (sigmoid only)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen answer's per-token NLL added to the loss (RPO); 0 = plain DPO."""
    batch_size: int = 16
    """Pairs per micro-batch (each pair is two sequences)."""
    max_steps: int = 400
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    eval_interval: int = 100
    """Steps between held-out evaluations (and at the end)."""
    eval_tasks: str | None = "builtin:tasks"
    """Tasks scored greedily at each evaluation (builtin:tasks heldout split, or a task
    .jsonl); none = off."""
    eval_limit: int = 10
    """Tasks per family scored at each evaluation."""

    def validate(self) -> None:
        """Shared checks, the data knobs and DPO's own."""
        super().validate()
        self.validate_data()
        if self.loss_type not in LOSS_TYPES:
            raise GlassboxError(
                f"--loss-type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}."
            )
        if self.beta <= 0:
            raise GlassboxError(f"--beta={self.beta} must be > 0 (try 0.1).")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise GlassboxError(
                f"--label-smoothing={self.label_smoothing} is outside [0, 0.5); it is the "
                "assumed share of flipped votes."
            )
        if self.rpo_alpha < 0:
            raise GlassboxError(f"--rpo-alpha={self.rpo_alpha} must be >= 0 (0 = plain DPO).")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise GlassboxError("--label-smoothing applies to --loss-type sigmoid only.")
        if self.eval_limit < 1:
            raise GlassboxError(f"--eval-limit={self.eval_limit} must be >= 1.")


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def completion_logprobs(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens (2N,).

    The LM head runs only at the K positions that predict a completion token (most of
    a row is prompt or padding), which is the same sum as
    ``masked_sum(sequence_logprobs(model, ids), completion_mask[:, 1:])`` at a fraction
    of the head's cost (the tests check the two agree).
    """
    with autocast(batch.ids.device):
        h = model.hidden(batch.ids)  # (2N, L, C)
    scored = batch.completion_mask[:, 1:]  # (2N, L-1): position t predicts ids[:, t+1]
    rows = scored.nonzero()[:, 0]  # (K,) row of each scored position
    with autocast(batch.ids.device):
        logits = model.lm_head(h[:, :-1][scored])  # (K, V)
    targets = batch.ids[:, 1:][scored]  # (K,)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (K,)
    out = torch.zeros(batch.ids.shape[0], device=h.device, dtype=token_logps.dtype)
    return out.index_add(0, rows, token_logps)  # (2N,)


def dpo_loss(
    policy: torch.Tensor,  # (2N,) summed completion log-probs, chosen rows first
    reference: torch.Tensor,  # (2N,) the same under the reference model
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: torch.Tensor | None = None,  # (2N,) completion tokens, for ipo
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO (or IPO) loss of a batch, and per-pair statistics (N,) each:
    ``chosen_reward``, ``rejected_reward`` (beta * log-ratio) and ``h``."""
    logratio = policy - reference  # (2N,) log pi/pi_ref of each completion
    n = logratio.shape[0] // 2
    chosen, rejected = logratio[:n], logratio[n:]  # (N,) each
    if loss_type == "ipo":
        if lengths is None:
            raise ValueError("ipo needs the completion lengths")
        h = chosen / lengths[:n] - rejected / lengths[n:]  # per-token means
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "sigmoid":
        h = chosen - rejected
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    stats = {"chosen_reward": beta * chosen.detach(), "rejected_reward": beta * rejected.detach()}
    return losses.mean(), stats | {"h": h.detach()}


def batch_metrics(stats: dict[str, torch.Tensor], logratio: torch.Tensor) -> dict[str, float]:
    """Reward accuracy, implicit rewards, their margin and the mean log-ratio of a batch."""
    cr, rr = stats["chosen_reward"], stats["rejected_reward"]
    return {
        "reward_accuracy": (cr > rr).float().mean().item(),
        "chosen_reward": cr.mean().item(),
        "rejected_reward": rr.mean().item(),
        "reward_margin": (cr - rr).mean().item(),
        "logratio": logratio.detach().mean().item(),
    }


def pair_loss(
    policy_model: torch.nn.Module,
    reference_model: torch.nn.Module,
    batch: PairBatch,
    cfg: DPOConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch (gradient through the policy only) and its metrics."""
    policy = completion_logprobs(policy_model, batch)  # (2N,)
    with torch.no_grad():
        reference = completion_logprobs(reference_model, batch)  # (2N,)
    lengths = batch.completion_mask.sum(1).float()  # (2N,)
    loss, stats = dpo_loss(policy, reference, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                           lengths)  # fmt: skip
    metrics = batch_metrics(stats, policy - reference)
    if cfg.rpo_alpha:
        n = policy.shape[0] // 2
        nll = -(policy[:n] / lengths[:n]).mean()  # chosen answers, per token
        loss = loss + cfg.rpo_alpha * nll
        metrics["chosen_nll"] = nll.item()
    return loss, metrics


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def evaluate_pairs(policy, reference, pairs, cfg: DPOConfig, pad_id: int, device) -> dict:
    """Held-out DPO loss, preference accuracy (implicit reward of chosen > rejected) and
    margin; the policy in eval mode meanwhile."""
    policy.eval()
    n, totals = 0, {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0}
    with torch.no_grad():
        for batch in batches(pairs, 2 * cfg.batch_size, pad_id):
            loss, m = pair_loss(policy, reference, batch.to(device), cfg)
            k = batch.margin.shape[0]
            totals["val_loss"] += loss.item() * k
            totals["val_accuracy"] += m["reward_accuracy"] * k
            totals["val_margin"] += m["reward_margin"] * k
            n += k
    policy.train()
    return {k: v / n for k, v in totals.items()}


def task_accuracy(model, tok, tasks: list) -> dict[str, float]:
    """Greedy accuracy on held-out tasks, as SFT reports it: ``acc_<family>`` and
    ``task_accuracy`` (the mean over families)."""
    from glassbox.train import sft

    row = sft.task_accuracy(model, tok, tasks)
    return {("task_accuracy" if k == "accuracy" else k): v for k, v in row.items()}


def train_dpo(cfg: DPOConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Run DPO; returns the last metrics row (held-out preference accuracy included)."""
    run, device = open_stage(cfg, "dpo", explicit)
    cfg = run.cfg
    model, tok, _ = load_start(cfg.base, device)
    reference, ref_tok, _ = load_start(cfg.reference or cfg.base, device, "--reference")
    _check_same_tokenizer(tok, ref_tok, cfg)
    reference.eval().requires_grad_(False)
    sets = load_preference_sets(cfg, tok, model.cfg.context_length, cfg.seed)
    tasks = _heldout_tasks(cfg)
    optimizers = build_optimizers(
        model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = restore_stage(run, model, optimizers, gen)[0] if run.snapshot is not None else 0

    def one_step(step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = sample_batch(sets.train, cfg.batch_size, tok.pad_id, gen).to(device)
            loss, metrics = pair_loss(model, reference, batch, cfg)
            (loss / cfg.grad_accum).backward()
            for k, v in {"train_loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            sums["tokens"] = sums.get("tokens", 0.0) + batch.tokens
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return sums

    def evaluate() -> dict[str, float]:
        row = evaluate_pairs(model, reference, sets.val, cfg, tok.pad_id, device)
        if tasks:
            model.eval()
            row |= task_accuracy(model, tok, tasks)
            model.train()
        return row

    def save(step: int) -> None:
        save_stage(run, step, model, tok, optimizers, gen, record={"pairs": sets.counts()})

    last = train_loop(run, step, optimizers, one_step, save, evaluate, title="DPO")
    return last | sets.counts()


def _heldout_tasks(cfg: DPOConfig) -> list:
    """The tasks --eval-tasks scores (``eval_limit`` per family), or none."""
    if not cfg.eval_tasks:
        return []
    from glassbox.train.sft import heldout_tasks

    return heldout_tasks(cfg.eval_tasks, cfg.eval_limit)


def _check_same_tokenizer(tok, ref_tok, cfg: DPOConfig) -> None:
    if tok.to_json() != ref_tok.to_json():
        raise GlassboxError(
            f"--reference {cfg.reference} has another tokenizer than --base {cfg.base}; "
            "DPO compares log-probabilities of the same tokens: use a reference from the "
            "same lineage (or drop --reference to use the base)."
        )
