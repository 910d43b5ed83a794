"""Pretraining recipe: next-token prediction on a corpus, read top to bottom.

    corpus -> tokenizer (trained or given) -> token memmap -> batches
    -> model -> cross-entropy -> Muon / AdamW (warmup + cosine, clipping, accumulation)
    -> periodic validation (nats/token and bits/byte), samples, metrics.jsonl, loss.png
    -> atomic snapshots (keep the last K) -> --resume continues exactly

The run directory, snapshots, clock, optimizers and processes come from the shared
training layer (``glassbox.train.run``, ``.optim``, ``.distributed``); this file is the
loop. Runs on one CPU, one GPU (bf16 autocast, optional torch.compile), or many
processes under ``torchrun`` with DDP or FSDP2 (``--strategy``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig, fit_to_corpus
from glassbox.data.corpus import load_corpus, split_documents
from glassbox.data.tokens import tokenize_corpus
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.infer.precision import TRAIN_CHOICES, check_name, choose_train_precision
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer
from glassbox.track import progress_bar
from glassbox.train import distributed as dist_
from glassbox.train.evaluate import language_model_loss
from glassbox.train.optim import build_optimizers, finished, lr_at, run_progress, set_lr
from glassbox.train.run import BUDGET_FIELDS, Run, Snapshot

# Pretraining may also change how much validation and sampling it does on resume.
RESUME_MAY_CHANGE = BUDGET_FIELDS | {"eval_tokens", "sample_tokens", "sample_prompt", "precision"}


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved in config.yaml and in every snapshot."""

    out: str = "runs/base"
    """Run directory to write (must be empty or new unless --resume)."""
    data: list[str] = field(default_factory=lambda: ["builtin:stdlib"])
    """Corpus: builtin:stdlib|builtin:python|builtin:pydoc, a file, directory, glob or .jsonl."""
    text_field: str = "text"
    """Text field of .jsonl records."""
    model: str = "tiny"
    """Model preset: test, tiny, small, gpt2-124m, gpt2-350m or llama-1b."""
    context_length: int | None = None
    """Context window in tokens; none = fitted to the corpus size, at most the preset's."""
    tokenizer: str | None = None
    """tokenizer.json to use; none = train one on the training split."""
    vocab_size: int | None = None
    """Vocabulary of a newly trained tokenizer; none = fitted to the corpus size."""
    tokenizer_max_chars: int = 8_000_000
    """Characters sampled evenly across the corpus to train the tokenizer."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    batch_size: int = 16
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: str = "muon"
    """muon (Muon on hidden matrices, AdamW elsewhere) or adamw."""
    lr: float = 6e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.05
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Weight decay on matrices (never on norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    max_steps: int = 600
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    max_minutes: float | None = None
    """Training-time budget in minutes (setup, evaluation and checkpoints excluded)."""
    log_interval: int = 10
    """Steps between metrics rows."""
    eval_interval: int = 100
    """Steps between validations (and samples)."""
    eval_tokens: int | None = 131072
    """Validation tokens per evaluation; none/all = the whole validation split."""
    sample_tokens: int = 48
    """Length of the sample printed at each evaluation (0 = none)."""
    sample_prompt: str = "def"
    """Prompt of those samples."""
    checkpoint_interval: int = 200
    """Steps between snapshots."""
    keep_last: int = 2
    """Snapshots kept in checkpoints/."""
    seed: int = 1337
    """Seed for initialisation and batches."""
    compile: bool = False
    """torch.compile the model."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    precision: str = "auto"
    """auto (bf16 autocast where measured faster on this machine, always on CUDA), fp32, bf16."""
    strategy: str = "ddp"
    """Under torchrun: ddp (replicate) or fsdp (FSDP2, shard weights and optimizer state)."""
    resume: bool = False
    """Continue the run in --out from its newest snapshot."""
    cache_dir: str | None = None
    """Token cache directory (default ~/.cache/glassbox or $GLASSBOX_CACHE)."""

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
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise GlassboxError(f"--eval-tokens={self.eval_tokens} must be >= 1 (or 'all').")
        check_name(self.precision, TRAIN_CHOICES, "--precision")
        if self.strategy not in dist_.STRATEGIES:
            raise GlassboxError(f"--strategy={self.strategy!r}; choose ddp or fsdp.")


def training_precision(run: Run, model, seq_len: int, device) -> str:
    """bf16 autocast or fp32, measured (see choose_train_precision) and the same on every
    process; a resumed ``auto`` run keeps its snapshot's choice, so it continues exactly."""
    cfg, d = run.cfg, run.d
    log = print if d.main else None
    saved = run.snapshot.state.get("precision") if run.snapshot is not None else None
    if cfg.precision == "auto" and saved in ("fp32", "bf16"):
        if log:
            log(f"precision auto: {saved} (the resumed run's)")
        return saved
    name = choose_train_precision(
        model, cfg.batch_size * seq_len, device, cfg.precision, cfg.cache_dir, log=log
    ).name
    return "bf16" if dist_.rank0_value(float(name == "bf16"), d) else "fp32"


def sharded(run: Run) -> bool:
    """FSDP2 across processes: every forward and every state gather is a collective."""
    return run.cfg.strategy == "fsdp" and run.d.world > 1


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def fit_defaults(cfg: PretrainConfig, docs, log) -> PretrainConfig:
    """``cfg`` with the vocabulary size and context length the user left out chosen
    from the corpus size (see :func:`glassbox.config.fit_to_corpus`), said in ``log``."""
    missing = [f for f in ("vocab_size", "context_length") if getattr(cfg, f) is None]
    if cfg.tokenizer and "vocab_size" in missing:
        missing.remove("vocab_size")  # the given tokenizer's own vocabulary is used
    if not missing:
        return cfg
    nbytes = sum(len(d.text.encode()) for d in docs)
    vocab, context, why = fit_to_corpus(nbytes, cfg.model)
    chosen = {"vocab_size": vocab, "context_length": context}
    chosen = {f: chosen[f] for f in missing}
    log(", ".join(f"{f.replace('_', ' ')} {v}" for f, v in chosen.items()) + f": {why}")
    return dataclasses.replace(cfg, **chosen)


def prepare_tokenizer(cfg: PretrainConfig, docs, snapshot: Snapshot | None) -> Tokenizer:
    """The run's tokenizer: from the snapshot on resume, a given file, or trained here."""
    if snapshot is not None:
        return Tokenizer.load(snapshot.path / "tokenizer.json")
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    train_docs, _ = split_documents(docs, cfg.val_fraction)  # never learn from validation
    total = sum(len(d.text) for d in train_docs)
    stride = max(1, total // max(1, cfg.tokenizer_max_chars))
    texts = [d.text for d in train_docs[::stride]]  # an even sample across the corpus
    return Tokenizer.train(texts, vocab_size=cfg.vocab_size, show_progress=False)


def shared_tokenizer(run: Run, docs) -> Tokenizer:
    """Under torchrun rank 0 learns the tokenizer and the others load it, so every
    process is sure to use the same token ids."""
    cfg, d = run.cfg, run.d
    path = run.out / "tokenizer.json"
    with dist_.main_process_first(d):
        if d.main or run.snapshot is not None or cfg.tokenizer:
            tokenizer = prepare_tokenizer(cfg, docs, run.snapshot)
            if d.world > 1 and d.main:
                tokenizer.save(path)
        else:
            tokenizer = Tokenizer.load(path)
    return tokenizer


# --------------------------------------------------------------------------------------
# Snapshots: whole tensors whatever the strategy, so any loader reads them
# --------------------------------------------------------------------------------------


def save_snapshot(run: Run, model, tokenizer, optimizers, gen, step, tokens_seen, precision):
    """Gather weights, optimizer and RNG state (collective) and write one snapshot.

    ``model`` is the module itself (under FSDP2 the sharded one: fully_shard works in
    place), never the DDP or torch.compile wrapper, so parameter names stay plain.
    """
    weights = opt_states = None
    if run.d.main or sharded(run):
        weights = dist_.full_model_state(model)
        opt_states = [dist_.full_optimizer_state(model, o) for o in optimizers]
    rng_all = dist_.gather_rng(gen, run.d)
    if not run.d.main:
        run.save(step, {}, {}, {})  # the collective clock read
        return
    if model.cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    record = ckpt.config_record(model.cfg, "pretrain", {"train": dataclasses.asdict(run.cfg)})
    files = {
        "model.safetensors": ckpt.tensors_bytes(weights, {"format": "pt"}),
        "config.json": ckpt.json_bytes(record),
        **tokenizer.files(),  # tokenizer.json (+ tokenizer_config.json for imported ones)
    }
    trainer, metas = {}, []
    for i, sd in enumerate(opt_states):
        trainer[f"optimizer{i}"], meta = ckpt.optimizer_state_to_tensors(sd)
        metas.append(meta)
    trainer["rng"] = {"data_rng": rng_all, "torch_rng": torch.get_rng_state()}
    state = {"tokens_seen": tokens_seen, "optimizers": metas, "precision": precision}
    run.save(step, files, trainer, state)


def restore_snapshot(run: Run, model, optimizers, gen) -> tuple[int, int]:
    """Weights, optimizer and RNG state from the run's snapshot; returns (step, tokens)."""
    snap = run.snapshot
    run.check_world()
    metas = snap.state.get("optimizers", [])
    if len(metas) != len(optimizers):
        raise GlassboxError(
            f"{snap.path} was saved with another --optimizer; resume with the same."
        )
    opt_states = []
    for i, (opt, meta) in enumerate(zip(optimizers, metas, strict=True)):
        tensors = snap.tensors[f"trainer/optimizer{i}.safetensors"]
        opt_states.append((opt, ckpt.optimizer_state_from_tensors(tensors, meta)))
    dist_.load_full_state(model, snap.tensors["model.safetensors"], opt_states)
    rng = snap.tensors["trainer/rng.safetensors"]
    torch.set_rng_state(rng["torch_rng"])
    gen.set_state(rng["data_rng"][run.d.rank].clone())  # its own storage: set_state needs it
    return snap.step, int(snap.state.get("tokens_seen", 0))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig, explicit: set[str] | None = None) -> dict:
    """Run pretraining as configured; returns the final metrics row.

    ``explicit`` names the settings the user gave (see :meth:`Run.open`); on resume the
    others come from the saved run.
    """
    cfg.validate()
    d, device = dist_.setup_distributed(cfg.device)
    # Sizes left to be fitted (None) are not a change on resume: the saved ones stay.
    given = {f.name for f in dataclasses.fields(cfg)} if explicit is None else set(explicit)
    given -= {f for f in ("vocab_size", "context_length") if getattr(cfg, f) is None}
    run = Run.open(cfg, "pretrain", d, given, RESUME_MAY_CHANGE)
    cfg = run.cfg
    torch.manual_seed(cfg.seed)

    # Data and tokenizer (sizes fitted to the corpus unless given)
    docs = load_corpus(cfg.data, cfg.text_field)
    if run.snapshot is None:  # a resumed run keeps its saved sizes
        run.cfg = cfg = fit_defaults(cfg, docs, print if d.main else lambda _: None)
    tokenizer = shared_tokenizer(run, docs)
    mcfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size)
    if cfg.context_length:
        mcfg = dataclasses.replace(mcfg, context_length=cfg.context_length)
    seq_len = mcfg.context_length
    with dist_.main_process_first(d):
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        data = tokenize_corpus(tokenizer, docs, cfg.val_fraction, seq_len, cache)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)

    # Model, processes, optimizers (after FSDP2 has sharded the parameters)
    model = Transformer(mcfg).to(device)
    train_model = dist_.wrap_model(model, cfg.strategy, d, device)
    optimizers = build_optimizers(
        model, cfg.optimizer, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
    step, tokens_seen = 0, 0
    if run.snapshot is not None:
        step, tokens_seen = restore_snapshot(run, model, optimizers, gen)
    precision = training_precision(run, model, seq_len, device)
    if cfg.compile:
        train_model = torch.compile(train_model)
    # Under FSDP2 every forward is a collective: all ranks evaluate and sample together.
    collective = sharded(run)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len * d.world
    if d.main:
        print(
            f"model {mcfg.name}: {model.num_params() / 1e6:.2f}M parameters, vocab "
            f"{mcfg.vocab_size}, context {seq_len}; data: {data.meta['train_tokens']:,} train / "
            f"{data.meta['val_tokens']:,} val tokens; {tokens_per_step:,} tokens/step on "
            f"{d.world} x {device.type} ({cfg.strategy if d.world > 1 else 'single'})"
            + (f"; resuming at step {step}" if run.snapshot else "")
        )

    last: dict = {}
    clock = run.clock  # training time: setup, evaluation, samples and snapshots excluded
    clock.start()
    elapsed_log, tok_log, loss_sum, loss_n = clock.elapsed(), 0, 0.0, 0
    with progress_bar() as bar:
        task = bar.add_task("pretrain", total=cfg.max_steps, completed=step, info="")
        while True:
            elapsed = clock.elapsed()
            if finished(cfg, step, elapsed):
                break
            # --- one optimizer step: forward/backward over grad_accum micro-batches
            lr = lr_at(cfg, step, elapsed)
            set_lr(optimizers, lr)
            for micro in range(cfg.grad_accum):
                x, y = data.get_batch(cfg.batch_size, seq_len, gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1
                with dist_.no_sync(train_model, sync), autocast(device, precision):
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

            # --- logging, evaluation, samples, snapshots (off the training clock)
            elapsed = clock.elapsed()
            done = finished(cfg, step, elapsed)
            do_eval = step % cfg.eval_interval == 0 or done
            if step % cfg.log_interval == 0 or do_eval:
                with clock.paused():
                    row = {
                        "step": step,
                        "elapsed_s": round(elapsed, 3),
                        "wall_s": round(clock.wall(), 3),
                        "tokens": tokens_seen,
                        "tokens_per_s": round(tok_log / max(elapsed - elapsed_log, 1e-9), 1),
                        "train_loss": loss_sum / max(1, loss_n),
                        "lr": lr,
                        "precision": precision,
                    }
                    elapsed_log, tok_log, loss_sum, loss_n = elapsed, 0, 0.0, 0
                    if do_eval and (d.main or collective):
                        vl, vb = language_model_loss(
                            model, data, token_bytes, seq_len, cfg.batch_size,
                            cfg.eval_tokens, device,
                        )  # fmt: skip
                        row |= {"val_loss": vl, "val_bpb": vb}
                        if cfg.sample_tokens > 0:
                            row["sample"] = sample_text(model, tokenizer, cfg)
                            if d.main:
                                bar.console.print(
                                    f"[dim]step {step} val_bpb {vb:.3f} sample:[/dim] "
                                    f"{row['sample']!r}"
                                )
                    run.log(row)
                    last = row if d.main else last
                    bar.update(
                        task,
                        completed=step,
                        info=f"{row['tokens_per_s']:,.0f} tok/s loss {row['train_loss']:.3f}"
                        + (f" val_bpb {row['val_bpb']:.3f}" if "val_bpb" in row else ""),
                    )
            else:
                bar.update(task, completed=step)
            if cfg.max_minutes:  # a time budget: re-estimate the total steps for the ETA
                progress = run_progress(step, cfg.max_steps, elapsed, cfg.max_minutes)
                bar.update(
                    task, total=min(cfg.max_steps, max(step, round(step / max(progress, 1e-9))))
                )
            if step % cfg.checkpoint_interval == 0 or done:
                with clock.paused():
                    save_snapshot(
                        run, model, tokenizer, optimizers, gen, step, tokens_seen, precision
                    )
                    run.plot()
    dist_.barrier(d)
    return last


@torch.no_grad()
def sample_text(model: Transformer, tokenizer: Tokenizer, cfg: PretrainConfig) -> str:
    """A short sample from the model as it trains (fixed seed, so runs compare)."""
    from glassbox.infer.generate import generate_text
    from glassbox.infer.sampling import SamplingParams

    prompt = [tokenizer.eot_id, *tokenizer.encode(cfg.sample_prompt)]
    n = min(cfg.sample_tokens, model.cfg.context_length - len(prompt))
    if n < 1:
        return ""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=cfg.seed)
    out = generate_text(model, tokenizer, prompt, n, params)
    model.train()
    return cfg.sample_prompt + out.text
