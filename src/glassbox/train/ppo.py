"""PPO against a learned reward model, anchored to the starting model by a KL penalty.

    every step (one rollout batch):
      rollout     B prompts, one sample each, through the engine (model in eval mode)
      score       the reward model's score of each whole sequence; the task checkers'
                  verdict on the same completions (true_accuracy: what the reward model
                  stands in for, logged so over-optimization shows)
      advantages  per-token rewards  -kl_coef * (logp - logp_ref)  + score at the last
                  token; GAE(gamma, lambda) against the value head's estimates; the
                  advantages whitened over the batch
      update      ppo_epochs passes over the batch in mini_batches: clipped policy loss
                  + vf_coef * clipped value loss, one optimizer step per mini-batch
      kl_coef     fixed, or adapted toward target_kl (Ziegler et al. 2019): the
                  coefficient grows when the rollouts' KL is above the target and shrinks
                  below it, by at most 20% of the error per horizon of samples

The value head is ``Linear(d_model, 1)`` on the policy's own final hidden states
(``Transformer.hidden``): a shared trunk. It costs one extra matrix instead of a second
transformer (a second copy would double the memory and the forward passes of a CPU run),
and the value loss shapes the same features the policy uses. TRL's PPO trainer instead
keeps a separate value model (a copy of the reward model, its own trunk) so the critic
cannot disturb the policy's features; it pays a second full model for that.

The policy's "old" log-probabilities are recomputed with a full forward pass (which also
gives the values), the same computation as the reference's, a frozen copy of the
starting model: so the KL is exactly 0 while the two are equal. Snapshots keep the
policy, the value head, both optimizers, the adaptive coefficient and the RNG state, so
``--resume`` continues exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glassbox import checkpoint as ckpt
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.infer.rollout import Rollout, collate_rollouts
from glassbox.infer.sampling import SamplingParams
from glassbox.track import read_metrics, save_figure
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
from glassbox.train.grpo import check_completions, fitting_prompts, heldout_accuracy
from glassbox.train.logprobs import entropy, gather_logprobs, masked_mean
from glassbox.train.optim import build_optimizers


@dataclass
class PPOConfig(RolloutConfig):
    """PPO settings: the shared fine-tuning knobs + the reward model, KL anchor and PPO."""

    out: str = "runs/ppo"
    """Run directory to write (must be empty or new unless --resume)."""
    reward: str | None = None
    """Reward-model checkpoint directory (a `glassbox reward` output); required."""
    batch_size: int = 32
    """Prompts per rollout batch (one sample each)."""
    grad_accum: int = 1
    """Unused by PPO (its batch is split into --mini-batches); kept at 1."""
    lr: float = 5e-5
    """Peak learning rate of the policy (AdamW)."""
    value_lr: float = 1e-3
    """Learning rate of the value head (AdamW)."""
    warmup_steps: int = 3
    """Linear warmup steps."""
    max_steps: int = 40
    """Rollout batches; or --max-minutes, whichever ends first."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    mini_batches: int = 2
    """Mini-batches per pass (one optimizer step each)."""
    cliprange: float = 0.2
    """Policy ratio clip: 1 +- cliprange."""
    cliprange_value: float = 0.2
    """Value clip: old value +- cliprange_value."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    kl_coef: float = 0.05
    """Initial (or fixed) coefficient of the per-token KL penalty."""
    adaptive_kl: bool = False
    """Adapt kl_coef toward --target-kl (Ziegler et al.)."""
    target_kl: float = 2.0
    """Target KL per sequence (nats) of the adaptive controller."""
    kl_horizon: int = 2000
    """Horizon of the adaptive controller, in samples."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch before GAE."""
    eval_interval: int = 10
    """Steps between held-out evaluations (and at the end)."""
    checkpoint_interval: int = 20
    """Steps between snapshots (and at the end)."""

    def validate(self) -> None:
        """Range checks, each naming the flag, its value and the valid range."""
        super().validate()
        if not self.reward:
            raise GlassboxError(
                "--reward is required: pass the directory of a trained reward model, e.g. "
                "`glassbox ppo runs/sft --reward runs/rm` (a `glassbox reward` output)."
            )
        for name in ("max_tokens", "ppo_epochs", "mini_batches", "kl_horizon", "max_seqs"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise GlassboxError(f"--{flag}={getattr(self, name)} must be >= 1.")
        if self.mini_batches > self.batch_size:
            raise GlassboxError(
                f"--mini-batches={self.mini_batches} is more than --batch-size={self.batch_size}; "
                "use at most one mini-batch per sample."
            )
        for name in ("cliprange", "cliprange_value", "gamma", "lam"):
            if not 0 < getattr(self, name) <= 1:
                flag = name.replace("_", "-")
                raise GlassboxError(f"--{flag}={getattr(self, name)} must be in (0, 1].")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.target_kl <= 0 or self.eval_limit < 0:
            raise GlassboxError(
                f"--kl-coef={self.kl_coef}, --vf-coef={self.vf_coef} and --eval-limit="
                f"{self.eval_limit} must be >= 0, --target-kl={self.target_kl} > 0."
            )
        if not 0 < self.value_lr < 1 or not 0 < self.temperature <= 10:
            raise GlassboxError(
                f"--value-lr={self.value_lr} must be in (0, 1), --temperature={self.temperature} "
                "in (0, 10]."
            )


# --------------------------------------------------------------------------------------
# The pieces (pure functions, tested by hand)
# --------------------------------------------------------------------------------------


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``x`` scaled to unit variance over the masked entries, with zero mean when
    ``shift_mean`` (advantages) or its own mean kept (rewards); 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor,  # (N, T) per-token rewards, 0 outside the mask
    values: torch.Tensor,  # (N, T) value estimates
    mask: torch.Tensor,  # (N, T) bool, one contiguous run of completion tokens per row
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, right to left:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` past a row's last token taken as 0. Returns (advantages,
    returns = advantages + values), both (N, T) and 0 outside the mask."""
    m = mask.to(values.dtype)
    N, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(N, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m[:, t]
        next_value = values[:, t] * m[:, t]  # 0 at padding: the episode ended
        next_adv = advantages[:, t]
    return advantages, (advantages + values) * m


def clipped_policy_loss(
    logp: torch.Tensor,  # (N, T)
    old_logp: torch.Tensor,  # (N, T)
    advantages: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T) bool
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate ``max(-A r, -A clip(r, 1-c, 1+c))``, masked mean over
    tokens; returns (loss, share of tokens where the clipped term was taken)."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(loss1, loss2), mask)
    clip_frac = masked_mean((loss2 > loss1).float(), mask)
    return loss, clip_frac


def clipped_value_loss(
    values: torch.Tensor,  # (N, T)
    old_values: torch.Tensor,  # (N, T)
    returns: torch.Tensor,  # (N, T)
    mask: torch.Tensor,  # (N, T) bool
    cliprange_value: float,
) -> torch.Tensor:
    """``0.5 * max((V - R)^2, (V_clipped - R)^2)`` masked mean, where ``V_clipped`` stays
    within ``cliprange_value`` of the rollout's value."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def adapt_kl_coef(coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: ``coef * (1 + e * n / horizon)`` with
    ``e = clip(kl / target - 1, -0.2, 0.2)``."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_samples / horizon)


@torch.no_grad()
def rollout_forward(
    model: nn.Module, value_head: nn.Module, reference: nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of the policy (log-probs and values from the same hidden states) and one
    of the reference over rollouts ``ids`` (N, L): (logp, ref_logp, values), each
    (N, L-1). The policy's log-probs are recomputed here, not taken from the engine, so
    the policy and the reference go through the same computation and their KL is
    exactly 0 while they are equal (the engine's cached decode differs by rounding)."""
    with autocast(ids.device):
        hidden = model.hidden(ids)  # (N, L, C)
        logp = gather_logprobs(model.lm_head(hidden), ids)  # (N, L-1)
        ref_logp = gather_logprobs(reference(ids), ids)  # (N, L-1)
        values = value_head(hidden[:, :-1].float()).squeeze(-1)  # (N, L-1)
    return logp, ref_logp, values


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (N, T): ``-kl_coef * kl`` at every completion token, plus the
    reward model's score (N,) at each row's last completion token."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = last_token_index(mask)  # (N,)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True in ``mask`` (N, T) -> (N,)."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).float().argmax(dim=1)


def check_vocabulary(policy_tok, reward_tok, reward_dir: str) -> None:
    """The reward model must read the policy's token ids: same vocabulary, id for id."""
    a, b = policy_tok.hf.get_vocab(), reward_tok.hf.get_vocab()
    if a != b:
        differ = sum(1 for k, v in a.items() if b.get(k) != v)
        raise GlassboxError(
            f"--reward {reward_dir} has a different vocabulary from the policy ({len(b)} vs "
            f"{len(a)} tokens, {differ} of the policy's tokens differ); it would score other "
            "token ids than the policy wrote. Train the reward model from the same base run."
        )


def load_reward_model(path: str, policy_tok, device: torch.device) -> nn.Module:
    """The frozen reward model from ``--reward``, after the vocabulary check."""
    if not Path(path).is_dir():
        raise GlassboxError(
            f"--reward {path} does not exist; pass the directory of a `glassbox reward` run."
        )
    loaded = ckpt.load_checkpoint(path, device)
    if loaded.architecture != "reward":
        raise GlassboxError(
            f"--reward {path} holds a {loaded.architecture!r} checkpoint, not a reward model; "
            "pass a `glassbox reward` output."
        )
    check_vocabulary(policy_tok, loaded.tokenizer, path)
    return loaded.model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(cfg: PPOConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train with PPO from ``cfg.base`` against ``cfg.reward``; returns the last row."""
    from glassbox.tasks import load_tasks

    run_, device = open_stage(cfg, "ppo", explicit, RESUME_MAY_CHANGE)
    cfg = run_.cfg
    model, tok, _ = load_start(cfg.base, device)
    reward_model = load_reward_model(cfg.reward, tok, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    value_head = nn.Linear(model.cfg.d_model, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    tasks = load_tasks(cfg.tasks, split="train")
    if not tasks:
        raise GlassboxError(f"--tasks={cfg.tasks} has no train tasks; give a source with some.")
    ctx = model.cfg.context_length
    tasks, prompts_all = fitting_prompts(tok, tasks, ctx, cfg.max_tokens, cfg.tasks)
    betas = (cfg.beta1, cfg.beta2)
    optimizers = build_optimizers(model, "adamw", cfg.lr, betas, weight_decay=cfg.weight_decay)
    optimizers.append(torch.optim.AdamW(value_head.parameters(), lr=cfg.value_lr, betas=betas))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, kl_coef = 0, cfg.kl_coef
    if run_.snapshot is not None:
        step, state = restore_stage(run_, model, optimizers, gen)
        value_head.load_state_dict(run_.snapshot.tensors["trainer/value_head.safetensors"])
        kl_coef = state["kl_coef"]
    value_lr_ratio = cfg.value_lr / cfg.lr  # train_loop sets one lr; the head keeps its ratio
    engine = rollout_engine(model, tok, cfg)  # built once, reused every step
    trainable = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())

    def rollout() -> tuple[list, list[Rollout], float]:
        """The step's prompts and one sample of each (seeded from ``gen``)."""
        picks = torch.randint(len(tasks), (cfg.batch_size,), generator=gen).tolist()
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        batch_tasks = [tasks[i] for i in picks]
        prompts = [prompts_all[i] for i in picks]
        params = SamplingParams(temperature=cfg.temperature, seed=seed)
        t0 = time.perf_counter()
        rollouts = sample_rollouts(engine, prompts, 1, params, cfg.max_tokens)
        return batch_tasks, rollouts, time.perf_counter() - t0

    @torch.no_grad()
    def score(batch, batch_tasks, rollouts) -> tuple[torch.Tensor, float]:
        """Reward-model scores (N,) of the whole sequences; true accuracy by the checkers."""
        scores = reward_model(batch.input_ids, batch.attention_mask).float()  # (N,)
        texts = [completion_text(tok, r) for r in rollouts]
        truth = check_completions(batch_tasks, texts, cfg.score_workers)
        return scores, sum(truth) / len(truth)

    @torch.no_grad()
    def advantages(batch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token rewards with the KL penalty, values, GAE and whitening."""
        mask = batch.completion_mask[:, 1:]  # (N, L-1)
        old_logp, ref_logp, old_values = rollout_forward(
            model, value_head, reference, batch.input_ids
        )
        kl = (old_logp - ref_logp) * mask  # (N, L-1)
        rewards = token_rewards(scores, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask)
        return {"old_logp": old_logp, "old_values": old_values, "adv": adv,
                "returns": returns, "kl": kl.sum(1)}  # fmt: skip

    def update(batch, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """ppo_epochs passes of mini-batch steps; returns the mean losses."""
        for group in optimizers[-1].param_groups:  # the value head's own learning rate
            group["lr"] = optimizers[0].param_groups[0]["lr"] * value_lr_ratio
        mask = batch.completion_mask[:, 1:]
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(mask), generator=gen)
            for idx in order.chunk(cfg.mini_batches):
                ids, m = batch.input_ids[idx], mask[idx]
                with autocast(device):
                    hidden = model.hidden(ids)  # (n, L, C)
                    logits = model.lm_head(hidden)  # (n, L, V)
                logp = gather_logprobs(logits, ids)  # (n, L-1)
                values = value_head(hidden[:, :-1].float()).squeeze(-1)  # (n, L-1)
                pg, clip_frac = clipped_policy_loss(
                    logp, data["old_logp"][idx], data["adv"][idx], m, cfg.cliprange
                )
                vf = clipped_value_loss(
                    values, data["old_values"][idx], data["returns"][idx], m, cfg.cliprange_value
                )
                (pg + cfg.vf_coef * vf).backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    sums["entropy"] += masked_mean(entropy(logits), m).item()
                sums["policy_loss"] += pg.item()
                sums["value_loss"] += vf.item()
                sums["clip_frac"] += clip_frac.item()
                n += 1
        return {k: v / n for k, v in sums.items()}

    def one_step(step: int) -> dict[str, float]:
        nonlocal kl_coef
        batch_tasks, rollouts, rollout_s = rollout()
        batch = collate_rollouts(rollouts, pad_id=tok.pad_id, device=device)
        scores, true_accuracy = score(batch, batch_tasks, rollouts)
        data = advantages(batch, scores)
        stats = update(batch, data)
        kl = data["kl"].mean().item()
        row = {"rm_score": scores.mean().item(), "true_accuracy": true_accuracy, "kl": kl,
               "kl_coef": kl_coef, **stats}  # fmt: skip
        if cfg.adaptive_kl:
            kl_coef = adapt_kl_coef(kl_coef, kl, cfg.target_kl, len(rollouts), cfg.kl_horizon)
        n_gen = sum(len(r.tokens) for r in rollouts)
        return row | {"response_len": n_gen / len(rollouts), "tokens": n_gen,
                      "rollout_tokens_per_s": n_gen / max(rollout_s, 1e-9)}  # fmt: skip

    def evaluate_heldout() -> dict[str, float]:
        return heldout_accuracy(model, tok, cfg.tasks, cfg.eval_limit, cfg.max_tokens)

    def save(step: int) -> None:
        head = {k: v.detach().clone() for k, v in value_head.state_dict().items()}
        save_stage(
            run_, step, model, tok, optimizers, gen,
            trainer={"value_head": head}, state={"kl_coef": kl_coef},
        )  # fmt: skip
        plot_overoptimization(run_.out / "metrics.jsonl", run_.out / "overoptimization.png")

    if run_.snapshot is None and cfg.eval_limit > 0:  # the starting point, for comparison
        with run_.clock.paused():
            run_.log({"step": 0} | evaluate_heldout())
    plot = ("policy_loss", "value_loss", "rm_score", "true_accuracy", "heldout_accuracy")
    return train_loop(run_, step, optimizers, one_step, save, evaluate_heldout, plot, "PPO")


def running_mean(xs: list[float], window: int) -> list[float]:
    """Mean of each value with up to ``window - 1`` values before it."""
    return [sum(xs[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(xs))]  # fmt: skip


def plot_overoptimization(metrics: Path, out: Path) -> Path | None:
    """Reward-model score and true accuracy against KL from the starting model, one y axis
    each, so the point where the proxy keeps rising and the truth stops shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics) if "kl" in r and "rm_score" in r]
    if not rows:
        return None
    rows.sort(key=lambda r: r["kl"])  # per-step points are noisy: show them + a running mean
    kl = [r["kl"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax2 = ax.twinx()
    for axis, key, color, label in ((ax, "rm_score", "tab:blue", "reward-model score"),
                                    (ax2, "true_accuracy", "tab:red", "true accuracy (task "
                                     "checkers)")):  # fmt: skip
        ys = [r[key] for r in rows]
        axis.scatter(kl, ys, s=8, color=color, alpha=0.35)
        axis.plot(kl, running_mean(ys, max(1, len(ys) // 6)), color=color, lw=2)
        axis.set_ylabel(label, color=color)
    ax.set_xlabel("KL(policy || start) per sequence, nats (steps sorted by KL)")
    ax2.set_ylim(-0.02, 1.02)
    ax.set_title("PPO: proxy reward vs true accuracy as the policy moves away")
    return save_figure(fig, out)
