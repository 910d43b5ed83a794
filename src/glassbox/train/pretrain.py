"""Pretraining: next-token prediction on a corpus, read top to bottom.

    corpus -> tokenizer (trained or given) -> token memmap -> batches
    -> model -> cross-entropy -> AdamW / Muon (warmup + cosine, clipping, accumulation)
    -> periodic validation (nats/token and bits/byte), samples, metrics.jsonl, loss.png
    -> atomic snapshots (keep the last K) -> --resume continues exactly

Runs on one CPU, one GPU (bf16 autocast, optional torch.compile), or many processes
under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig
from glassbox.data.corpus import load_corpus, split_documents
from glassbox.data.tokens import TokenData, tokenize_corpus
from glassbox.device import autocast, resolve_device
from glassbox.errors import GlassboxError
from glassbox.infer.generate import generate_text
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer
from glassbox.track import MetricsLog, plot_curves, progress_bar


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved in config.json and trainer state."""

    out: str = "runs/base"
    data: list[str] = field(default_factory=lambda: ["builtin:stdlib"])
    text_field: str = "text"
    model: str = "tiny"  # a ModelConfig preset
    context_length: int | None = None  # override the preset's context
    tokenizer: str | None = None  # tokenizer.json to use; None = train one on the data
    vocab_size: int = 4096  # for a newly trained tokenizer
    tokenizer_max_chars: int = 8_000_000  # text sampled to train the tokenizer
    val_fraction: float = 0.05
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    optimizer: str = "muon"  # "muon" (Muon on hidden matrices, AdamW elsewhere) or "adamw"
    lr: float = 6e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 600
    max_minutes: float | None = None  # wall-clock budget; the schedule follows whichever ends first
    log_interval: int = 10
    eval_interval: int = 100
    eval_tokens: int | None = 131072  # validation tokens per evaluation (None = all)
    sample_tokens: int = 48  # length of the sample printed at each evaluation (0 = none)
    sample_prompt: str = "def"
    checkpoint_interval: int = 200
    keep_last: int = 2
    seed: int = 1337
    compile: bool = False
    device: str = "auto"
    resume: bool = False
    cache_dir: str | None = None  # token cache (default ~/.cache/glassbox)

    def validate(self) -> None:
        positive = ["batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval"]
        positive += ["checkpoint_interval", "keep_last"]
        for name in positive:
            if getattr(self, name) < 1:
                raise GlassboxError(
                    f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1."
                )
        ModelConfig.from_name(self.model)  # an unknown preset fails before any data is read
        if self.optimizer not in ("adamw", "muon"):
            raise GlassboxError(f"--optimizer={self.optimizer!r}; choose 'adamw' or 'muon'.")
        if not 0 < self.lr < 1:
            raise GlassboxError(f"--lr={self.lr} is out of range; use a value in (0, 1).")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise GlassboxError(f"--max-minutes={self.max_minutes} must be > 0.")


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def prepare_tokenizer(cfg: PretrainConfig, docs, resume_dir: Path | None) -> Tokenizer:
    """The run's tokenizer: from the snapshot on resume, a given file, or trained here."""
    if resume_dir is not None:
        return Tokenizer.load(resume_dir / "tokenizer.json")
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    train_docs, _ = split_documents(docs, cfg.val_fraction)  # never learn from validation
    total = sum(len(d.text) for d in train_docs)
    stride = max(1, total // max(1, cfg.tokenizer_max_chars))
    texts = [d.text for d in train_docs[::stride]]  # an even sample across the corpus
    return Tokenizer.train(texts, vocab_size=cfg.vocab_size, show_progress=False)


def build_optimizers(model: Transformer, cfg: PretrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on everything; or Muon on the blocks' 2-D matrices with AdamW on the rest.

    Weight decay applies to matrices only, never to norms.
    """
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")]
    embeds = [
        p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("layers.")
    ]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    betas = (cfg.beta1, cfg.beta2)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "adamw":
        groups = [
            {"params": matrices + embeds, "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        return [torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)]
    adam_groups = [
        {"params": embeds, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return [
        torch.optim.Muon(
            matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
        ),
        torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=betas, **fused),
    ]


def lr_at(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr over the run's progress.

    Progress is steps done over max_steps, or elapsed time over max_minutes, whichever
    is further along, so a wall-clock budget still ends on a fully decayed schedule.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = run_progress(cfg, step, elapsed_s)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def run_progress(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    p = step / cfg.max_steps
    if cfg.max_minutes:
        p = max(p, elapsed_s / (cfg.max_minutes * 60))
    return p


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Transformer,
    data: TokenData,
    token_bytes: torch.Tensor,  # (V,) UTF-8 bytes per token id
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    device: torch.device,
) -> tuple[float, float]:
    """Validation loss in nats/token and bits per UTF-8 byte of the validation text."""
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    for x, y in data.val_batches(batch_size, seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats += loss.sum().item()
        tokens += y.numel()
        nbytes += int(token_bytes[y.flatten()].sum())
    model.train()
    return nats / tokens, nats / math.log(2) / max(1, nbytes)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def save_snapshot(
    run_dir: Path,
    cfg: PretrainConfig,
    model: Transformer,
    tokenizer: Tokenizer,
    optimizers: list[torch.optim.Optimizer],
    data_rng: torch.Tensor,  # (world, n) every rank's data-sampler state
    step: int,
    elapsed_s: float,
    tokens_seen: int,
) -> None:
    """One complete, atomic snapshot for --resume, and the latest weights at top level."""
    record = ckpt.config_record(model.cfg, "pretrain", {"train": dataclasses.asdict(cfg)})
    files = {
        "model.safetensors": ckpt.tensors_bytes(ckpt.model_state(model), {"format": "pt"}),
        "config.json": ckpt.json_bytes(record),
        "tokenizer.json": tokenizer.to_json().encode(),
    }
    opt_meta = []
    for i, opt in enumerate(optimizers):
        tensors, meta = ckpt.optimizer_state_to_tensors(opt)
        files[f"trainer/optimizer{i}.safetensors"] = ckpt.tensors_bytes(tensors)
        opt_meta.append(meta)
    files["trainer/rng.safetensors"] = ckpt.tensors_bytes(
        {"data_rng": data_rng, "torch_rng": torch.get_rng_state()}
    )
    state = {
        "step": step,
        "elapsed_s": elapsed_s,
        "tokens_seen": tokens_seen,
        "world_size": int(data_rng.shape[0]),
        "optimizers": opt_meta,
        "train": dataclasses.asdict(cfg),
    }
    files["trainer/state.json"] = ckpt.json_bytes(state)
    ckpt.write_snapshot(run_dir, step, files, cfg.keep_last)
    ckpt.save_model_dir(run_dir, model, tokenizer, "pretrain", {"train": dataclasses.asdict(cfg)})


def load_snapshot(snap: Path, model: Transformer, optimizers, world: int, rank: int):
    """Restore weights, optimizer and RNG state; returns (step, elapsed_s, tokens, data_rng)."""
    state = ckpt.load_json(snap / "trainer" / "state.json")
    if state.get("world_size") != world:
        raise GlassboxError(
            f"{snap} was saved by {state.get('world_size')} processes but this run has "
            f"{world}; resume with the same number of processes."
        )
    weights = ckpt.load_tensors(snap / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise GlassboxError(f"{snap / 'model.safetensors'} does not match the model config.")
    if len(state["optimizers"]) != len(optimizers):
        raise GlassboxError(f"{snap} was saved with another --optimizer; resume with the same.")
    for i, (opt, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        tensors = ckpt.load_tensors(snap / "trainer" / f"optimizer{i}.safetensors")
        opt.load_state_dict(ckpt.optimizer_state_from_tensors(tensors, meta))
    rng = ckpt.load_tensors(snap / "trainer" / "rng.safetensors")
    torch.set_rng_state(rng["torch_rng"])
    return state["step"], state["elapsed_s"], state["tokens_seen"], rng["data_rng"][rank]


@contextlib.contextmanager
def main_process_first(d: Dist):
    """Run the block on rank 0 first, then on the other ranks (no-op without torchrun)."""
    if d.world > 1 and not d.main:
        dist.barrier()
    yield
    if d.world > 1 and d.main:
        dist.barrier()


def rank0_value(x: float, d: Dist) -> float:
    """Rank 0's value of ``x`` on every process (identity when not distributed)."""
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return float(t)


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rng(gen: torch.Generator, d: Dist) -> torch.Tensor:
    state = gen.get_state().view(1, -1)
    if d.world == 1:
        return state
    state = state.to(_comm_device())
    parts = [torch.empty_like(state) for _ in range(d.world)]
    dist.all_gather(parts, state)
    return torch.cat(parts).cpu()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig) -> dict:
    """Run pretraining as configured; returns the final metrics row."""
    cfg.validate()
    d, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)
    resume_dir = ckpt.latest_snapshot(run_dir) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        raise GlassboxError(f"--resume: {run_dir} has no snapshot in checkpoints/ to resume from.")
    if not cfg.resume and ckpt.list_snapshots(run_dir):
        raise GlassboxError(
            f"{run_dir} already holds a run ({ckpt.list_snapshots(run_dir)[-1].name}); pass "
            "--resume to continue it, or choose a new --out so nothing is overwritten."
        )

    # Data and tokenizer
    docs = load_corpus(cfg.data, cfg.text_field)
    # Under torchrun, rank 0 learns the tokenizer and fills the token cache; the other
    # ranks then load both, so every process is sure to use the same token ids.
    shared_tok = run_dir / "tokenizer.json"
    with main_process_first(d):
        if d.main or resume_dir is not None or cfg.tokenizer:
            tokenizer = prepare_tokenizer(cfg, docs, resume_dir)
            if d.world > 1 and d.main:
                tokenizer.save(shared_tok)
        else:
            tokenizer = Tokenizer.load(shared_tok)
    mcfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size)
    if cfg.context_length:
        mcfg = dataclasses.replace(mcfg, context_length=cfg.context_length)
    seq_len = mcfg.context_length
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    with main_process_first(d):
        data = tokenize_corpus(tokenizer, docs, cfg.val_fraction, seq_len, cache)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)

    # Model and optimizers
    model = Transformer(mcfg).to(device)
    optimizers = build_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
    step, elapsed_prev, tokens_seen = 0, 0.0, 0
    if resume_dir is not None:
        step, elapsed_prev, tokens_seen, data_state = load_snapshot(
            resume_dir, model, optimizers, d.world, d.rank
        )
        gen.set_state(data_state)
    train_model = model
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)

    metrics = MetricsLog(
        run_dir / "metrics.jsonl", truncate_after_step=step if resume_dir else None
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len * d.world
    if d.main:
        print(
            f"model {mcfg.name}: {model.num_params() / 1e6:.2f}M parameters, vocab "
            f"{mcfg.vocab_size}, context {seq_len}; data: {data.meta['train_tokens']:,} train / "
            f"{data.meta['val_tokens']:,} val tokens; {tokens_per_step:,} tokens/step on "
            f"{d.world} x {device.type}" + (f"; resuming at step {step}" if resume_dir else "")
        )

    last: dict = {}
    # The training clock (elapsed_s, --max-minutes, tokens_per_s) excludes evaluation,
    # samples and checkpoint writes; wall_s in metrics.jsonl counts everything.
    t_start = time.perf_counter()
    paused = 0.0
    elapsed_log, tok_log, loss_sum, loss_n = elapsed_prev, 0, 0.0, 0
    with progress_bar() as bar:
        task = bar.add_task("pretrain", total=cfg.max_steps, completed=step, info="")
        while True:
            # Every process must agree on the clock: it sets the learning rate and the end.
            elapsed = rank0_value(elapsed_prev + time.perf_counter() - t_start - paused, d)
            if step >= cfg.max_steps or run_progress(cfg, step, elapsed) >= 1.0:
                break
            # --- one optimizer step: forward/backward over grad_accum micro-batches
            lr = lr_at(cfg, step, elapsed)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y = data.get_batch(cfg.batch_size, seq_len, gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or d.world == 1
                ctx = (
                    train_model.no_sync() if not sync and d.world > 1 else contextlib.nullcontext()
                )
                with ctx, autocast(device):
                    logits = train_model(x)  # (B, T, V)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
                loss_n += 1
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            tok_log += tokens_per_step

            # --- logging, evaluation, samples, snapshots
            elapsed = rank0_value(elapsed_prev + time.perf_counter() - t_start - paused, d)
            done = step >= cfg.max_steps or run_progress(cfg, step, elapsed) >= 1.0
            do_eval = step % cfg.eval_interval == 0 or done
            if step % cfg.log_interval == 0 or do_eval:
                now = time.perf_counter()
                row = {
                    "step": step,
                    "elapsed_s": round(elapsed, 3),
                    "wall_s": round(now - t_start, 3),
                    "tokens": tokens_seen,
                    "tokens_per_s": round(tok_log / max(elapsed - elapsed_log, 1e-9), 1),
                    "train_loss": loss_sum / max(1, loss_n),
                    "lr": lr,
                }
                elapsed_log, tok_log, loss_sum, loss_n = elapsed, 0, 0.0, 0
                if do_eval and d.main:
                    vl, vb = evaluate(
                        model, data, token_bytes, seq_len, cfg.batch_size, cfg.eval_tokens, device
                    )
                    row |= {"val_loss": vl, "val_bpb": vb}
                    if cfg.sample_tokens > 0:
                        row["sample"] = sample_text(model, tokenizer, cfg)
                        bar.console.print(
                            f"[dim]step {step} val_bpb {vb:.3f} sample:[/dim] {row['sample']!r}"
                        )
                if d.main:
                    metrics.write(row)
                    last = row
                bar.update(
                    task,
                    completed=step,
                    info=f"{row['tokens_per_s']:,.0f} tok/s loss {row['train_loss']:.3f}"
                    + (f" val_bpb {row['val_bpb']:.3f}" if "val_bpb" in row else ""),
                )
                paused += time.perf_counter() - now
            else:
                bar.update(task, completed=step)
            if cfg.max_minutes:  # a time budget: re-estimate the total steps for the ETA
                progress = run_progress(cfg, step, elapsed)
                bar.update(
                    task, total=min(cfg.max_steps, max(step, round(step / max(progress, 1e-9))))
                )
            if step % cfg.checkpoint_interval == 0 or done:
                t_ckpt = time.perf_counter()
                rng_all = gather_rng(gen, d)
                if d.main:
                    save_snapshot(
                        run_dir,
                        cfg,
                        model,
                        tokenizer,
                        optimizers,
                        rng_all,
                        step,
                        elapsed,
                        tokens_seen,
                    )
                    plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png")
                paused += time.perf_counter() - t_ckpt
    if d.world > 1:
        dist.barrier()
    return last


@torch.no_grad()
def sample_text(model: Transformer, tokenizer: Tokenizer, cfg: PretrainConfig) -> str:
    """A short sample from the model as it trains (fixed seed, so runs compare)."""
    prompt = [tokenizer.eot_id, *tokenizer.encode(cfg.sample_prompt)]
    n = min(cfg.sample_tokens, model.cfg.context_length - len(prompt))
    if n < 1:
        return ""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=cfg.seed)
    out = generate_text(model, tokenizer, prompt, n, params)
    model.train()
    return cfg.sample_prompt + out.text
