"""What every stage that starts from a trained model shares: SFT, reward, DPO, PPO, GRPO.

    cfg: SFTConfig(FinetuneConfig)          the common knobs below + the stage's own
    run, device = open_stage(cfg, "sft", explicit)      fresh or --resume (one process)
    model, tok, record = load_start(cfg.base, device)   the checkpoint to start from
    optimizers = build_optimizers(model, "adamw", ...)  trainable parameters only
    step, state = restore_stage(run, model, optimizers, gen)   on --resume
    last = train_loop(run, step, one_step, evaluate, save)
        one_step(step) -> {"loss": ..., "tokens": ...}   a whole optimizer step
        evaluate()     -> {"val_loss": ...}              every eval_interval and at the end
        save(step)     -> save_stage(run, step, model, tok, optimizers, gen, ...)

Each stage stays one self-contained file (its data, its loss, its step); this file is
the loop cadence (learning rate, metrics rows, evaluation, snapshots, progress bar) so
the stages do not each grow their own copy.

Checkpoints are in the common format: ``model.safetensors`` + ``config.json`` +
tokenizer files at the top of ``--out``, so ``generate``, ``chat``, ``serve``,
``export`` and the next stage load them; ``checkpoints/step_N/`` adds the optimizer,
the random-number state and any extra tensors (a value head, LoRA adapters) for an
exact ``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from glassbox import checkpoint as ckpt
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine
from glassbox.infer.rollout import Rollout
from glassbox.infer.sampling import SamplingParams
from glassbox.track import progress_bar
from glassbox.train import distributed as dist_
from glassbox.train.optim import finished, lr_at, run_progress, set_lr
from glassbox.train.run import BUDGET_FIELDS, Run

# Evaluation settings may also change on resume.
RESUME_MAY_CHANGE = BUDGET_FIELDS | {"eval_tasks", "eval_limit", "rollout_dtype"}


@dataclass
class FinetuneConfig:
    """Settings shared by every stage that starts from a trained model."""

    base: str | None = None
    """Checkpoint directory to start from (a pretrain, sft or imported run)."""
    out: str = "runs/finetune"
    """Run directory to write (must be empty or new unless --resume)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    batch_size: int = 16
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 200
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    max_minutes: float | None = None
    """Training-time budget in minutes (evaluation and checkpoints excluded)."""
    log_interval: int = 10
    """Steps between metrics rows."""
    eval_interval: int = 50
    """Steps between evaluations (and at the end)."""
    checkpoint_interval: int = 100
    """Steps between snapshots (and at the end)."""
    keep_last: int = 2
    """Snapshots kept in checkpoints/."""
    seed: int = 1337
    """Seed for data order, sampling and new weights."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    resume: bool = False
    """Continue the run in --out from its newest snapshot."""

    def validate(self) -> None:
        """Range checks of the shared knobs; stages extend this for their own."""
        if not self.base:
            raise GlassboxError(
                "No starting checkpoint: pass the directory of a trained model, e.g. "
                "`glassbox sft runs/base ...` (a `glassbox pretrain` or `import` output)."
            )
        positive = ["batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval"]
        positive += ["checkpoint_interval", "keep_last"]
        for name in positive:
            if getattr(self, name) < 1:
                raise GlassboxError(
                    f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1."
                )
        if not 0 < self.lr < 1:
            raise GlassboxError(f"--lr={self.lr} is out of range; use a value in (0, 1).")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise GlassboxError(f"--max-minutes={self.max_minutes} must be > 0.")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise GlassboxError("--warmup-steps and --grad-clip must be >= 0.")


@dataclass
class RolloutConfig(FinetuneConfig):
    """The knobs PPO and GRPO share: where prompts come from and how rollouts sample."""

    tasks: str = "builtin:tasks"
    """Prompt source: builtin:tasks or a task file (.jsonl); its train split is used."""
    max_tokens: int = 48
    """Most tokens generated per sample."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1 = the policy itself)."""
    max_seqs: int = 64
    """Engine slots: sequences decoded together during rollouts."""
    score_workers: int = 2
    """Sandboxes run at once when checking code completions."""
    log_interval: int = 1
    """Steps between metrics rows."""
    eval_limit: int = 10
    """Held-out tasks per family in each evaluation (0 = no evaluation)."""
    rollout_dtype: str = "fp32"
    """Rollout precision: fp32 (the policy itself), auto (measured), bf16 or fp16: a copy
    re-synced from the policy before every batch (old log-probs then come from it)."""


# --------------------------------------------------------------------------------------
# Opening a stage and its starting model
# --------------------------------------------------------------------------------------


def open_stage(
    cfg: FinetuneConfig,
    stage: str,
    explicit: set[str] | None,
    may_change: frozenset[str] = RESUME_MAY_CHANGE,
) -> tuple[Run, torch.device]:
    """Validate ``cfg``, open the run directory (fresh or resume) and pick the device.

    The fine-tuning stages run in one process (one CPU or one GPU); under torchrun they
    refuse rather than train the same model N times.
    """
    cfg.validate()
    d, device = dist_.setup_distributed(cfg.device)
    if d.world > 1:
        raise GlassboxError(
            f"`glassbox {stage}` runs in one process (WORLD_SIZE={d.world}); launch it "
            "without torchrun."
        )
    run = Run.open(cfg, stage, d, explicit, may_change)
    torch.manual_seed(run.cfg.seed)
    return run, device


def load_start(path: str, device: torch.device, what: str = "--base"):
    """The language model to start from: (model in train mode, tokenizer, record)."""
    loaded = ckpt.load_checkpoint(path, device)
    if loaded.architecture != "transformer":
        raise GlassboxError(
            f"{what} {path} holds a {loaded.architecture!r} checkpoint (stage "
            f"{loaded.record.get('stage')!r}); start from a language model: a `glassbox "
            "pretrain`, `sft` or `import` output."
        )
    return loaded.model.train(), loaded.tokenizer, loaded.record


# --------------------------------------------------------------------------------------
# Snapshots in the common format
# --------------------------------------------------------------------------------------


def save_stage(
    run: Run,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizers: list[torch.optim.Optimizer],
    gen: torch.Generator,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    record: dict[str, Any] | None = None,
    trainer: dict[str, dict[str, torch.Tensor]] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Write a snapshot whose top-level files load like any checkpoint.

    ``weights`` default to the model's own (tied duplicates dropped); a LoRA run passes
    the merged ones. ``record`` is merged into config.json (a reward model sets
    ``"architecture": "reward"``). ``trainer`` adds tensors only a resume needs
    (trainer/NAME.safetensors); ``state`` adds JSON to trainer/state.json.
    """
    weights = ckpt.model_state(model) if weights is None else weights
    extra = {"base": run.cfg.base, "train": dataclasses.asdict(run.cfg)} | (record or {})
    files = {
        "model.safetensors": ckpt.tensors_bytes(weights, {"format": "pt"}),
        "config.json": ckpt.json_bytes(ckpt.config_record(model.cfg, run.stage, extra)),
        **tokenizer.files(),
    }
    tensors: dict[str, dict[str, torch.Tensor]] = dict(trainer or {})
    metas = []
    for i, opt in enumerate(optimizers):
        tensors[f"optimizer{i}"], meta = ckpt.optimizer_state_to_tensors(opt.state_dict())
        metas.append(meta)
    tensors["rng"] = {"data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}
    run.save(step, files, tensors, {**(state or {}), "optimizers": metas})


def restore_stage(
    run: Run,
    model: torch.nn.Module | None,
    optimizers: list[torch.optim.Optimizer],
    gen: torch.Generator,
) -> tuple[int, dict[str, Any]]:
    """Weights (unless ``model`` is None: e.g. LoRA restores its adapters itself),
    optimizer and RNG state from the run's snapshot; returns (step, trainer state).
    Extra tensors are in ``run.snapshot.tensors["trainer/NAME.safetensors"]``."""
    snap = run.snapshot
    if model is not None:
        weights = snap.tensors["model.safetensors"]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise GlassboxError(
                f"{snap.path} does not match this stage's model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the run's own settings."
            )
    metas = snap.state.get("optimizers", [])
    if len(metas) != len(optimizers):
        raise GlassboxError(
            f"{snap.path} has {len(metas)} optimizer states, not {len(optimizers)}; resume "
            "with the run's own settings."
        )
    for i, (opt, meta) in enumerate(zip(optimizers, metas, strict=True)):
        tensors = snap.tensors[f"trainer/optimizer{i}.safetensors"]
        opt.load_state_dict(ckpt.optimizer_state_from_tensors(tensors, meta))
    rng = snap.tensors["trainer/rng.safetensors"]
    torch.set_rng_state(rng["torch_rng"])
    gen.set_state(rng["data_rng"].clone())
    return snap.step, snap.state


# --------------------------------------------------------------------------------------
# Rollouts for the RL stages (PPO, GRPO)
# --------------------------------------------------------------------------------------


_POLICY_OF: weakref.WeakKeyDictionary[Engine, torch.nn.Module] = weakref.WeakKeyDictionary()


def rollout_engine(model: torch.nn.Module, tokenizer, cfg: RolloutConfig) -> Engine:
    """The engine rollouts run on, built once: over the policy itself, or (``rollout_dtype``
    auto/bf16/fp16 choosing a half precision, see glassbox.infer.precision) over a cast
    copy whose weights :func:`sample_rollouts` re-syncs from the policy every batch."""
    from glassbox.infer.precision import cast_model, choose_dtype

    choice = choose_dtype(
        model, tokenizer, cfg.rollout_dtype, log=lambda s: print("rollouts:", s),
        batch=cfg.max_seqs,
    )  # fmt: skip
    if choice.name == "fp32":
        return Engine(model, tokenizer, max_seqs=cfg.max_seqs)
    half = cast_model(copy.deepcopy(model).eval().requires_grad_(False), choice)
    engine = Engine(half, tokenizer, max_seqs=cfg.max_seqs)
    _POLICY_OF[engine] = model
    return engine


@torch.no_grad()
def sync_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy (and cast) every weight of ``src`` into ``dst``, a same-shaped copy of it."""
    for d, s in zip(dst.state_dict().values(), src.state_dict().values(), strict=True):
        d.copy_(s)


def sample_rollouts(
    engine: Engine,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    max_tokens: int,
) -> list[Rollout]:
    """``n`` samples of every prompt through the run's one engine (prompt-major order),
    with its model in eval mode for the rollout and back in train mode after (a
    half-precision rollout copy is first synced from the policy)."""
    policy = _POLICY_OF.get(engine)
    if policy is not None:
        sync_weights(engine.model, policy)
        return engine.generate_batch(prompts, n, params, max_tokens)
    model = engine.model
    model.eval()
    try:
        return engine.generate_batch(prompts, n, params, max_tokens)
    finally:
        model.train()


def completion_text(tokenizer, rollout: Rollout) -> str:
    """A rollout's generated text, without the stop token that ended it."""
    ids = rollout.tokens[:-1] if rollout.finish_reason == "stop" else rollout.tokens
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train_loop(
    run: Run,
    step: int,
    optimizers: list[torch.optim.Optimizer],
    one_step: Callable[[int], dict[str, float]],
    save: Callable[[int], None],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    plot_keys: tuple[str, ...] = ("train_loss", "val_loss"),
    title: str | None = None,
) -> dict[str, Any]:
    """Run optimizer steps until the budget is spent; returns the last metrics row.

    ``one_step(step)`` does one whole optimizer step (forward, backward, clip, update)
    at the learning rate set here and returns numbers to log: they are averaged over
    each ``log_interval`` (a ``"tokens"`` entry is summed into tokens/s). Evaluation,
    snapshots and plots run off the training clock.
    """
    cfg, clock = run.cfg, run.clock
    last: dict[str, Any] = {}
    sums: dict[str, float] = {}
    n_steps, t_log = 0, clock.elapsed()
    with progress_bar() as bar:
        task = bar.add_task(run.stage, total=cfg.max_steps, completed=step, info="")
        while not finished(cfg, step, clock.elapsed()):
            lr = lr_at(cfg, step, clock.elapsed())
            set_lr(optimizers, lr)
            for key, value in one_step(step).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            step += 1
            n_steps += 1
            elapsed = clock.elapsed()
            done = finished(cfg, step, elapsed)
            do_eval = evaluate is not None and (step % cfg.eval_interval == 0 or done)
            if step % cfg.log_interval == 0 or do_eval or done:
                with clock.paused():
                    row: dict[str, Any] = {"step": step, "elapsed_s": round(elapsed, 3), "lr": lr}
                    tokens = sums.pop("tokens", None)
                    row |= {k: v / n_steps for k, v in sums.items()}
                    if tokens is not None:
                        row["tokens_per_s"] = round(tokens / max(elapsed - t_log, 1e-9), 1)
                    sums, n_steps, t_log = {}, 0, elapsed
                    if do_eval:
                        row |= evaluate()
                    run.log(row)
                    last = row
                    bar.update(task, completed=step, info=_summary(row))
            else:
                bar.update(task, completed=step)
            if cfg.max_minutes:  # a time budget: re-estimate the total for the ETA
                progress = run_progress(step, cfg.max_steps, elapsed, cfg.max_minutes)
                bar.update(task, total=min(cfg.max_steps, max(step, round(step / progress))))
            if step % cfg.checkpoint_interval == 0 or done:
                with clock.paused():
                    save(step)
                    run.plot(plot_keys, title or run.stage)
    return last


def _summary(row: dict[str, Any]) -> str:
    """A few numbers of a metrics row for the progress bar."""
    keys = [k for k in row if k not in ("step", "elapsed_s", "lr")][:4]
    return " ".join(f"{k} {row[k]:.3g}" for k in keys if isinstance(row[k], int | float))
