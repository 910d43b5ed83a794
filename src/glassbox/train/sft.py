"""Supervised fine-tuning, read top to bottom: chat (full or LoRA) and domain adaptation.

    chat:    conversations (builtin:tasks, builtin:world-qa, or JSONL {"messages": [...]})
             -> encode_conversation: ids + assistant-only loss mask
             -> pack into rows of seq_len (segment_ids + per-conversation positions)
             -> cross-entropy on assistant tokens only -> AdamW (warmup + cosine)
             -> val_loss on held-out conversations, greedy accuracy on held-out tasks
    domain:  a corpus (any --data load_corpus accepts) -> next-token training, reporting
             the domain's val_bpb and the base's own corpus's orig_val_bpb (forgetting)
    LoRA:    --lora-rank > 0 freezes the base and trains adapters (train/lora.py);
             model.safetensors holds the merged weights, adapter.safetensors the adapter

The run directory, loop cadence, snapshots and exact resume come from the shared layer
(:mod:`glassbox.train.finetune`); this file is the data, the loss and the step.

Packing: short conversations share a row; a token attends only to earlier tokens of its
own conversation (``segment_ids``) and positions restart at 0 for each (``input_pos``),
so a packed batch's loss equals the same conversations' loss unpacked. A conversation
longer than ``seq_len + 1`` tokens is cut to fit; the run prints how many were cut (and
drops those left without any assistant token).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glassbox import checkpoint as ckpt
from glassbox.conversation import ROLES, encode_conversation
from glassbox.data.jsonl import field as json_field
from glassbox.data.jsonl import read_jsonl
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.train import lora as lora_
from glassbox.train.finetune import (
    RESUME_MAY_CHANGE,
    FinetuneConfig,
    load_start,
    open_stage,
    restore_stage,
    save_stage,
    train_loop,
)
from glassbox.train.optim import build_optimizers

BUILTIN_TASKS = "builtin:tasks"
MODES = ("chat", "domain")
# How much validation a run does may also change on resume.
SFT_MAY_CHANGE = RESUME_MAY_CHANGE | {"eval_tokens"}
Messages = list[dict[str, str]]


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning: chat (full or LoRA) or domain-adaptive continued pretraining."""

    out: str = "runs/sft"
    """Run directory to write (must be empty or new unless --resume)."""
    data: list[str] = field(default_factory=lambda: [BUILTIN_TASKS])
    """Chat: builtin:tasks, builtin:world-qa or JSONL files of {"messages": [{"role", "content"}, ...]}; domain: any corpus spec (file, dir, glob, .jsonl, builtin:stdlib ...)."""  # noqa: E501
    mode: str = "chat"
    """chat (loss on assistant tokens of conversations) or domain (next-token on a corpus)."""
    text_field: str = "text"
    """Domain mode: text field of .jsonl corpus records."""
    packing: bool = True
    """Chat: pack several conversations per row (no cross-attention); off = right-padded rows."""
    seq_len: int | None = None
    """Tokens per row; none = the model's context length."""
    val_fraction: float = 0.05
    """Share of conversations (files) or documents (domain) held out; builtin:tasks uses its heldout split."""  # noqa: E501
    eval_tokens: int | None = 65536
    """Domain mode: validation tokens per bpb figure; none/all = the whole split."""
    lr: float = 2e-3
    """Peak learning rate (AdamW); LoRA usually wants a few times more than full."""
    batch_size: int = 16
    """Rows per micro-batch."""
    max_steps: int = 300
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    eval_interval: int = 100
    """Steps between evaluations (and at the end)."""
    lora_rank: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / rank) * B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    lora_targets: list[str] = field(default_factory=lambda: list(lora_.ALL_LINEAR))
    """Linear layers to adapt (by attribute name)."""
    eval_tasks: str | None = BUILTIN_TASKS
    """Chat mode: tasks scored greedily at each evaluation (builtin:tasks heldout split, or a task .jsonl); none = off."""  # noqa: E501
    eval_limit: int = 20
    """Tasks per family scored at each evaluation."""
    cache_dir: str | None = None
    """Token cache directory for domain mode (default ~/.cache/glassbox or $GLASSBOX_CACHE)."""

    def validate(self) -> None:
        """The shared checks plus this stage's own."""
        super().validate()
        if self.mode not in MODES:
            raise GlassboxError(f"--mode={self.mode!r}; choose one of {', '.join(MODES)}.")
        if not self.data:
            raise GlassboxError("--data is empty; pass builtin:tasks, a chat .jsonl or a corpus.")
        if self.seq_len is not None and self.seq_len < 8:
            raise GlassboxError(f"--seq-len={self.seq_len} must be >= 8 (or none = context).")
        if not 0 < self.val_fraction < 1:
            raise GlassboxError(f"--val-fraction={self.val_fraction} must be in (0, 1).")
        if self.lora_rank < 0:
            raise GlassboxError(f"--lora-rank={self.lora_rank} must be >= 0 (0 = full).")
        if self.eval_limit < 1:
            raise GlassboxError(f"--eval-limit={self.eval_limit} must be >= 1.")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise GlassboxError(f"--eval-tokens={self.eval_tokens} must be >= 1 (or 'all').")


# --------------------------------------------------------------------------------------
# Chat data: conversations -> examples (ids + assistant mask)
# --------------------------------------------------------------------------------------


def read_chat_file(path: str | Path) -> list[Messages]:
    """Conversations of a JSONL file, one ``{"messages": [{"role", "content"}, ...]}``
    per line (TRL's conversational format); mistakes name the file, the line and the field.
    """
    out = []
    for where, record in read_jsonl(path, 'conversations ({"messages": [...]})'):
        messages = json_field(record, "messages", list, where)
        out.append(_check_messages(messages, where))
    return out


def _check_messages(messages: list, where: str) -> Messages:
    if not messages:
        raise GlassboxError(f"{where}: field 'messages' is empty; add the conversation's turns.")
    checked = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise GlassboxError(f"{at} must be an object with 'role' and 'content'.")
        role = json_field(m, "role", str, at)
        content = json_field(m, "content", str, at)
        if role not in ROLES:
            raise GlassboxError(f"{at}.role={role!r} is not one of {list(ROLES)}.")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise GlassboxError(
            f"{where}: field 'messages' has no assistant turn, so there is nothing to learn; "
            "add the reply as {'role': 'assistant', 'content': ...}."
        )
    return checked


def load_conversations(specs: list[str], val_fraction: float) -> tuple[list[Messages], list]:
    """(train, validation) conversations: builtin:tasks uses its train/heldout splits; a
    file gives every k-th conversation (k = round(1 / val_fraction)) to validation."""
    train: list[Messages] = []
    val: list[Messages] = []
    for spec in specs:
        if spec in (BUILTIN_TASKS, "builtin:tools"):
            from glassbox.tasks import load_tasks, sft_conversations

            train += sft_conversations(load_tasks(spec, split="train"))
            val += sft_conversations(load_tasks(spec, split="heldout"))
        elif spec == "builtin:world-qa":
            from glassbox.data.world import builtin_world, sft_conversations

            t, v = sft_conversations(builtin_world())
            train, val = train + t, val + v
        elif spec.startswith("builtin:"):
            raise GlassboxError(
                f"--data {spec!r} is not chat data; use {BUILTIN_TASKS}, builtin:tools, "
                "builtin:world-qa or a "
                ".jsonl of conversations (a corpus like builtin:stdlib needs --mode domain)."
            )
        else:
            convs = read_chat_file(spec)
            every = max(2, round(1 / val_fraction))
            train += [c for i, c in enumerate(convs) if i % every != every - 1]
            val += [c for i, c in enumerate(convs) if i % every == every - 1]
    return train, val


@dataclass
class Example:
    """One conversation as next-token pairs: ``targets[t]`` follows ``ids[t]``; ``mask[t]``
    is 1 where that target is an assistant token to learn. All three have length L - 1."""

    ids: list[int]
    targets: list[int]
    mask: list[int]


def encode_examples(tok, conversations: list[Messages], seq_len: int, what: str) -> list[Example]:
    """Conversations -> examples of at most ``seq_len`` positions; longer ones are cut
    (counted on stderr) and any left without an assistant token are dropped."""
    examples, cut, dropped = [], 0, 0
    for messages in conversations:
        chat = encode_conversation(tok, messages)
        ids, mask = chat.ids[: seq_len + 1], chat.loss_mask[: seq_len + 1]
        cut += len(chat.ids) > seq_len + 1
        if not any(mask[1:]):
            dropped += 1
            continue
        examples.append(Example(ids[:-1], ids[1:], mask[1:]))
    if cut:
        print(
            f"warning: {cut} of {len(conversations)} {what} conversations are longer than "
            f"--seq-len {seq_len} + 1 tokens and were cut ({dropped} of them left no assistant "
            "token and were dropped); raise --seq-len or shorten them.",
            file=sys.stderr,
        )
    if not examples:
        raise GlassboxError(f"No {what} conversation has an assistant token within --seq-len.")
    return examples


# --------------------------------------------------------------------------------------
# Batches: packed rows or right-padded rows
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A micro-batch for :func:`sft_loss`, every tensor (B, T) on the same device.

    ``ids`` are the inputs and ``targets`` the next tokens; ``mask`` is True where the
    target is an assistant token to learn (padding and prompts are False). ``input_pos``
    is each token's position within its own conversation and ``segment_ids`` which
    conversation of the row it belongs to (packed rows); both None for right-padded rows,
    which the plain causal mask handles (padding only follows a conversation).
    ``n_tokens`` counts the positions that hold a real token (for throughput).
    """

    ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    input_pos: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    n_tokens: int = 0

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            self.ids.to(device), self.targets.to(device), self.mask.to(device),
            move(self.input_pos), move(self.segment_ids), self.n_tokens,
        )  # fmt: skip


def _rows_to_batch(rows: list[list[Example]], width: int, pad_id: int, packed: bool) -> Batch:
    """Lay out rows of examples into (B, width) tensors; the tail of a row is padding
    (its own segment, positions from 0, never in the loss)."""
    ids, targets, mask, pos, seg = [], [], [], [], []
    for row in rows:
        pad = width - sum(len(ex.ids) for ex in row)
        ids.append([t for ex in row for t in ex.ids] + [pad_id] * pad)
        targets.append([t for ex in row for t in ex.targets] + [pad_id] * pad)
        mask.append([m for ex in row for m in ex.mask] + [0] * pad)
        pos.append([p for ex in row for p in range(len(ex.ids))] + list(range(pad)))
        seg.append([s for s, ex in enumerate(row) for _ in ex.ids] + [len(row)] * pad)
    n_tokens = sum(len(ex.ids) for row in rows for ex in row)
    ids_t, targets_t = torch.tensor(ids), torch.tensor(targets)  # (B, width) each
    mask_t = torch.tensor(mask, dtype=torch.bool)
    if not packed:
        return Batch(ids_t, targets_t, mask_t, n_tokens=n_tokens)
    return Batch(ids_t, targets_t, mask_t, torch.tensor(pos), torch.tensor(seg), n_tokens)


def pack(examples: list[Example], seq_len: int, batch_size: int = 16) -> list[Batch]:
    """Pack examples, in order, into rows of ``seq_len`` positions and the rows into
    batches of ``batch_size`` (the last may be smaller).

    Each example goes into the first of the last few open rows with room (first fit over
    a small window, so the data order is kept almost as given and packing stays dense).
    """
    window, rows, fill = 8, [], []
    for ex in examples:
        n = len(ex.ids)
        if n > seq_len:
            raise GlassboxError(f"An example of {n} tokens does not fit --seq-len {seq_len}.")
        open_ = range(max(0, len(rows) - window), len(rows))
        r = next((i for i in open_ if fill[i] + n <= seq_len), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(ex)
        fill[r] += n
    return [
        _rows_to_batch(rows[i : i + batch_size], seq_len, 0, packed=True)
        for i in range(0, len(rows), batch_size)
    ]


def pad_batches(examples: list[Example], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """One example per row, right-padded to the longest of its batch."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(ex.ids) for ex in chunk)
        out.append(_rows_to_batch([[ex] for ex in chunk], width, pad_id, packed=False))
    return out


def sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy on assistant tokens: (mean over every masked token of the batch,
    number of those tokens). Each token weighs the same, whatever its conversation's
    length (not a mean of per-conversation means); a batch without one gives 0."""
    with autocast(batch.ids.device):
        logits = model(batch.ids, input_pos=batch.input_pos, segment_ids=batch.segment_ids)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none"
    )  # (B*T,)
    mask = batch.mask.flatten()
    n = int(mask.sum())
    return (nll * mask).sum() / max(n, 1), n


class ChatStream:
    """Endless training batches: epoch e visits every example once in an order drawn
    from a generator seeded with (seed, e), so a cursor (epoch, batch) resumes exactly."""

    def __init__(self, examples: list[Example], cfg: SFTConfig, seq_len: int, pad_id: int):
        self.examples, self.cfg, self.seq_len, self.pad_id = examples, cfg, seq_len, pad_id
        self.epoch, self.index = 0, 0
        self.batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        order = torch.randperm(len(self.examples), generator=gen).tolist()
        shuffled = [self.examples[i] for i in order]
        if self.cfg.packing:
            return pack(shuffled, self.seq_len, self.cfg.batch_size)
        return pad_batches(shuffled, self.cfg.batch_size, self.pad_id)

    def next(self) -> Batch:
        """The next micro-batch (a new epoch starts when one ends)."""
        if self.index >= len(self.batches):
            self.seek(self.epoch + 1, 0)
        self.index += 1
        return self.batches[self.index - 1]

    def seek(self, epoch: int, index: int) -> None:
        """Continue from batch ``index`` of epoch ``epoch`` (a saved cursor)."""
        if epoch != self.epoch:
            self.batches = self._epoch_batches(epoch)
        self.epoch, self.index = epoch, index

    def cursor(self) -> dict[str, int]:
        """Where the stream is, for the snapshot."""
        return {"epoch": self.epoch, "batch": self.index}


def packing_density(batches: list[Batch]) -> float:
    """Share of positions that hold a real token (not padding)."""
    return sum(b.n_tokens for b in batches) / max(1, sum(b.ids.numel() for b in batches))


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def chat_val_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Mean cross-entropy over every assistant token of the validation conversations."""
    total, count = 0.0, 0
    for batch in batches:
        loss, n = sft_loss(model, batch.to(device))
        total += loss.item() * n
        count += n
    return total / max(count, 1)


def heldout_tasks(spec: str, per_family: int) -> list:
    """The first ``per_family`` held-out chat tasks of each family of ``spec``."""
    from glassbox.tasks import load_tasks
    from glassbox.tasks.evaluate import limit_per_family

    chat = [task for task in load_tasks(spec, split="heldout") if task.chat]
    out = limit_per_family(chat, per_family)
    if not out:
        raise GlassboxError(f"--eval-tasks {spec} has no chat tasks to score.")
    return out


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, tok, tasks: list) -> dict[str, float]:
    """Greedy accuracy on ``tasks`` (at most 64 new tokens each, or half the context if
    less): ``acc_<family>`` per family and ``accuracy``, the share of all scored tasks
    answered correctly (tasks too long for the context are skipped)."""
    from glassbox.tasks.evaluate import evaluate

    max_tokens = min(64, model.cfg.context_length // 2)
    report = evaluate(model, tok, tasks, n=1, k=(1,), temperature=0.0, max_tokens=max_tokens,
                      max_seqs=32, show_progress=False)  # fmt: skip
    row = {f"acc_{r.family}": r.accuracy for r in report.rows}
    return row | {"accuracy": report.overall.accuracy}


# --------------------------------------------------------------------------------------
# Domain data: the user's corpus and the base's own corpus
# --------------------------------------------------------------------------------------


def base_corpus(record: dict) -> tuple[list[str] | None, str, float, str]:
    """(data specs, text field, val fraction, note) of the corpus the base model was
    pretrained on, from its config.json; specs are None (with a note) when unknown."""
    train = record.get("train")
    if not isinstance(train, dict) or not train.get("data"):
        return None, "text", 0.05, "the base has no training-data record (imported?)"
    if record.get("stage") != "pretrain" and train.get("mode", "domain") != "domain":
        return None, "text", 0.05, f"the base is a {record.get('stage')} run on chat data"
    data = train["data"] if isinstance(train["data"], list) else [train["data"]]
    return data, train.get("text_field", "text"), float(train.get("val_fraction", 0.05)), ""


def tokenize(tok, specs, text_field: str, val_fraction: float, seq_len: int, cache_dir):
    """A corpus's train/validation tokens (cached, as in pretraining)."""
    from glassbox.data.corpus import load_corpus
    from glassbox.data.tokens import tokenize_corpus

    docs = load_corpus(specs, text_field)
    cache = Path(cache_dir) if cache_dir else None
    return tokenize_corpus(tok, docs, val_fraction, seq_len, cache)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def sft(cfg: SFTConfig, explicit: set[str] | None = None) -> dict:
    """Fine-tune ``cfg.base`` as configured; returns the last metrics row.

    ``explicit`` names the settings the user gave (see ``Run.open``); on resume the
    others come from the saved run.
    """
    run, device = open_stage(cfg, "sft", explicit, SFT_MAY_CHANGE)
    cfg = run.cfg
    model, tok, record = load_start(cfg.base, device)
    seq_len = min(cfg.seq_len or model.cfg.context_length, model.cfg.context_length)
    if cfg.lora_rank > 0:
        lora_.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    optimizers = build_optimizers(model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.mode == "chat":
        one_step, evaluate, cursor, seek, info = chat_parts(cfg, model, tok, seq_len, device)
        plot_keys: tuple[str, ...] = ("train_loss", "val_loss", "accuracy")
    else:
        one_step, evaluate, info = domain_parts(cfg, model, tok, record, seq_len, device, gen)
        cursor, seek = (lambda: {}), (lambda state: None)
        plot_keys = ("train_loss", "val_loss", "val_bpb", "orig_val_bpb")
    step = 0
    if run.snapshot is not None:
        step, state = restore_stage(run, None if cfg.lora_rank else model, optimizers, gen)
        if cfg.lora_rank:
            lora_.load_lora_state(model, run.snapshot.tensors["trainer/adapter.safetensors"])
        seek(state.get("data", {}))
    print(
        f"sft ({cfg.mode}{f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ', full'}): "
        f"{lora_.trainable_parameters(model) / 1e6:.3f}M of {model.num_params() / 1e6:.3f}M "
        f"parameters train; seq_len {seq_len}; {info}"
        + (f"; resuming at step {step}" if run.snapshot else "")
    )
    if run.snapshot is None and evaluate is not None:  # the starting point, for comparison
        with run.clock.paused():
            run.log({"step": 0} | evaluate())

    def save(step: int) -> None:
        save_checkpoint(run, step, model, tok, optimizers, gen, cursor())

    last = train_loop(run, step, optimizers, step_fn(cfg, model, optimizers, one_step), save,
                      evaluate, plot_keys, f"sft ({cfg.mode})")  # fmt: skip
    return last | {"out": str(run.out)} if last else last


def step_fn(cfg: SFTConfig, model, optimizers, micro_loss):
    """One whole optimizer step over ``grad_accum`` micro-batches: the micro-batch
    losses are averaged, the gradient clipped, every optimizer stepped."""
    params = [p for p in model.parameters() if p.requires_grad]

    def one_step(step: int) -> dict[str, float]:
        total, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            loss, n = micro_loss()
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens += n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"train_loss": total, "tokens": tokens}

    return one_step


def chat_parts(cfg: SFTConfig, model, tok, seq_len: int, device: torch.device):
    """Chat mode's micro-batch loss, evaluation, data cursor and a summary line."""
    train_convs, val_convs = load_conversations(cfg.data, cfg.val_fraction)
    train = encode_examples(tok, train_convs, seq_len, "training")
    val = encode_examples(tok, val_convs, seq_len, "validation") if val_convs else []
    stream = ChatStream(train, cfg, seq_len, tok.pad_id)
    val_batches = pad_batches(val, cfg.batch_size, tok.pad_id)
    tasks = heldout_tasks(cfg.eval_tasks, cfg.eval_limit) if cfg.eval_tasks else []

    def micro_loss() -> tuple[torch.Tensor, int]:
        batch = stream.next().to(device)
        return sft_loss(model, batch)[0], batch.n_tokens  # tokens/s counts every real token

    def evaluate() -> dict[str, Any]:
        model.eval()
        row: dict[str, Any] = {}
        if val_batches:
            row["val_loss"] = chat_val_loss(model, val_batches, device)
        if tasks:
            row |= task_accuracy(model, tok, tasks)
        model.train()
        return row

    def seek(state: dict[str, int]) -> None:
        if state:
            stream.seek(state["epoch"], state["batch"])

    density = packing_density(stream.batches)
    info = (
        f"{len(train)} train / {len(val)} val conversations, "
        f"{len(stream.batches)} batches per epoch"
        + f" ({'packed' if cfg.packing else 'padded'}: {density:.0%} of positions hold tokens)"
        + (f"; scoring {len(tasks)} held-out tasks at each evaluation" if tasks else "")
    )
    return micro_loss, evaluate if (val_batches or tasks) else None, stream.cursor, seek, info


def domain_parts(cfg: SFTConfig, model, tok, record, seq_len, device, gen: torch.Generator):
    """Domain mode's micro-batch loss, evaluation (both bpb figures) and a summary line."""
    from glassbox.train.evaluate import language_model_loss

    data = tokenize(tok, cfg.data, cfg.text_field, cfg.val_fraction, seq_len, cfg.cache_dir)
    specs, text_field, orig_fraction, note = base_corpus(record)
    orig = None
    if specs:
        orig = tokenize(tok, specs, text_field, orig_fraction, seq_len, cfg.cache_dir)
    token_bytes = torch.tensor(tok.token_byte_lengths(), device=device)

    def micro_loss() -> tuple[torch.Tensor, int]:
        x, y = data.get_batch(cfg.batch_size, seq_len, gen)  # (B, T) each
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), y.numel()

    def evaluate() -> dict[str, Any]:
        args = (token_bytes, seq_len, cfg.batch_size, cfg.eval_tokens, device)
        val_loss, val_bpb = language_model_loss(model, data, *args)
        row: dict[str, Any] = {"val_loss": val_loss, "val_bpb": val_bpb}
        if orig is not None:
            row["orig_val_bpb"] = language_model_loss(model, orig, *args)[1]
        return row

    info = (
        f"domain data {data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val "
        "tokens; "
        + (f"forgetting measured on {', '.join(specs)}" if specs else f"no orig_val_bpb: {note}")
    )
    return micro_loss, evaluate, info


def save_checkpoint(run, step: int, model, tok, optimizers, gen, cursor: dict) -> None:
    """A snapshot in the common format. A LoRA run's model.safetensors holds the merged
    weights (every loader reads them as a plain model); adapter.safetensors and
    adapter_config.json are written beside them, and the snapshot keeps the adapter
    (trainer/adapter.safetensors) for --resume."""
    cfg = run.cfg
    if not cfg.lora_rank:
        save_stage(run, step, model, tok, optimizers, gen, state={"data": cursor})
        return
    adapter = lora_.lora_state(model)
    config = {
        "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
        "targets": list(cfg.lora_targets), "base": cfg.base,
    }  # fmt: skip
    save_stage(run, step, model, tok, optimizers, gen, weights=lora_.merged_state(model),
               record={"lora": config}, trainer={"adapter": adapter},
               state={"data": cursor})  # fmt: skip
    ckpt.atomic_write_bytes(run.out / "adapter.safetensors", ckpt.tensors_bytes(adapter))
    ckpt.atomic_write_bytes(run.out / "adapter_config.json", ckpt.json_bytes(config))
