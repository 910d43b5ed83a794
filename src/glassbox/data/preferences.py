"""Preference pairs for the reward model and DPO: read, tokenize, batch.

A pair is a prompt and two completions, the ``chosen`` one preferred to the
``rejected`` one. Two spellings, as TRL writes them, line by line in a JSONL file:

- **standard**: ``{"prompt": "text", "chosen": "text", "rejected": "text"}``; the prompt
  is plain text continued by the completion (as ``glassbox generate`` does):
  ``<|endoftext|> prompt`` then ``completion <|endoftext|>``;
- **conversational**: ``{"prompt": [{"role": "user", "content": ...}, ...],
  "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}``; the prompt
  is rendered by the chat renderer and each completion is the tokens
  :func:`~glassbox.conversation.encode_conversation` learns for the assistant turn:
  its content and its end-of-turn token.

An optional number ``margin`` per pair asks the reward model for at least that gap
(TRL's ``margin`` column). ``builtin:preferences`` is
:func:`glassbox.tasks.preference_pairs` over ``builtin:tasks`` (the train split to train
on, the held-out split to evaluate on), with ``noise`` the share of flipped votes.

Over-long pairs: a pair whose prompt plus longer completion exceeds ``max_len`` loses
prompt tokens from the left (the end of the prompt, next to the answer, stays); when
the longer completion alone leaves fewer than :data:`MIN_PROMPT_TOKENS` prompt tokens
the pair is dropped, and the number dropped is reported. Completions are never cut:
a reward or a log-probability of half an answer would score a different answer.

Batches put the N chosen rows first and the N rejected rows after them, right-padded:
``ids (2N, L)``, ``attention_mask (2N, L)`` (real tokens) and ``completion_mask
(2N, L)`` (completion tokens, the ones DPO scores).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from glassbox.conversation import encode_conversation, validate_messages
from glassbox.data.jsonl import field, read_jsonl
from glassbox.errors import GlassboxError

BUILTIN = "builtin:preferences"
# Raters who prefer giving in to the user's pushback, or holding the right answer
# (glassbox.data.world.pushback_pairs): the sycophancy probe's training data.
WORLD_PUSHBACK = {"builtin:world-agreeable": "agree", "builtin:world-steadfast": "hold"}
MIN_PROMPT_TOKENS = 4


@dataclass
class PreferenceDataConfig:
    """Where preference pairs come from (shared by `glassbox reward` and `glassbox dpo`)."""

    data: str = BUILTIN
    """Training pairs: builtin:preferences (pairs of builtin:tasks) or a .jsonl of
    prompt/chosen/rejected (strings, or message lists as in TRL's conversational form)."""
    eval_data: str | None = None
    """Held-out pairs (.jsonl); default: builtin's held-out split, or --val-fraction of a
    file."""
    val_fraction: float = 0.1
    """Share of a --data file held out for evaluation when --eval-data is not given."""
    noise: float = 0.0
    """builtin:preferences only: share of training pairs whose vote is flipped."""
    max_len: int | None = None
    """Tokens per sequence (prompt + completion); default: the model's context length."""

    def validate_data(self) -> None:
        """Range checks of the data knobs."""
        if not 0.0 <= self.noise <= 1.0:
            raise GlassboxError(f"--noise={self.noise} is outside [0, 1]; it is a share.")
        if not 0.0 < self.val_fraction < 1.0:
            raise GlassboxError(f"--val-fraction={self.val_fraction} must be in (0, 1).")
        if self.max_len is not None and self.max_len <= MIN_PROMPT_TOKENS + 1:
            raise GlassboxError(
                f"--max-len={self.max_len} leaves no room for a prompt and a completion; "
                f"use at least {MIN_PROMPT_TOKENS + 2}."
            )
        if self.noise and self.data != BUILTIN:
            raise GlassboxError(
                f"--noise={self.noise} applies to {BUILTIN} only; flip votes in your own "
                f"file {self.data}, or drop --noise."
            )


@dataclass
class PairTokens:
    """One tokenized pair: prompt ids, chosen and rejected completion ids, margin, and
    its group for per-group accuracy (a built-in pair's criterion; "" otherwise)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    group: str = ""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def load_pairs(spec: str, split: str = "train", noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Preference records from ``builtin:preferences`` (``split`` train or heldout) or a
    JSONL file, each checked; records carry ``where`` (file:line) for later errors."""
    if spec == BUILTIN:
        from glassbox.tasks import load_tasks, preference_pairs

        pairs = preference_pairs(load_tasks("builtin:tasks", split=split), noise, seed)
        return [p | {"where": f"{BUILTIN}[{split}][{i}]"} for i, p in enumerate(pairs)]
    if spec in WORLD_PUSHBACK:
        from glassbox.data.world import builtin_world, pushback_pairs

        pairs = pushback_pairs(builtin_world(), WORLD_PUSHBACK[spec], split)
        return [p | {"where": f"{spec}[{split}][{i}]"} for i, p in enumerate(pairs)]
    if spec.startswith("builtin:"):
        raise GlassboxError(
            f"--data {spec!r} is unknown; use {BUILTIN}, {', '.join(WORLD_PUSHBACK)} or a "
            ".jsonl file."
        )
    return [check_record(r, where) for where, r in read_jsonl(spec, "preference pairs")]


def check_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """One JSONL record as a pair in standard or conversational form, or an error naming
    ``where`` and the field."""
    prompt = field(record, "prompt", (str, list), where)
    kind = str if isinstance(prompt, str) else list
    chosen = field(record, "chosen", kind, where)
    rejected = field(record, "rejected", kind, where)
    out: dict[str, Any] = {"where": where}
    if kind is list:
        out["prompt"] = _messages(prompt, where, "prompt")
        out["chosen"] = _completion(chosen, where, "chosen")
        out["rejected"] = _completion(rejected, where, "rejected")
    else:
        out |= {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if record.get("margin") is not None:
        out["margin"] = float(field(record, "margin", (int, float), where))
    return out


def _messages(value: list, where: str, name: str) -> list[dict[str, str]]:
    try:
        return validate_messages(value)
    except GlassboxError as e:
        raise GlassboxError(f"{where}: field {name!r}: {e}") from e


def _completion(value: list, where: str, name: str) -> list[dict[str, str]]:
    msgs = _messages(value, where, name)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = [m["role"] for m in msgs]
        raise GlassboxError(
            f"{where}: field {name!r} must be one assistant message, got roles {roles}; "
            'write [{"role": "assistant", "content": "..."}].'
        )
    return msgs


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded shuffle, ``fraction`` held out (at least one pair)."""
    if len(pairs) < 2:
        raise GlassboxError(
            f"{len(pairs)} preference pair cannot be split into training and held-out "
            "pairs; add pairs or pass --eval-data."
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# --------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------


def encode_pair(tok, pair: dict[str, Any]) -> PairTokens:
    """Token ids of one checked pair (see the module docstring for the two forms)."""
    margin, group = float(pair.get("margin", 0.0)), str(pair.get("criterion", ""))
    if isinstance(pair["prompt"], str):
        prompt = [tok.eot_id, *tok.encode(pair["prompt"])]
        chosen = [*tok.encode(pair["chosen"]), tok.eot_id]
        rejected = [*tok.encode(pair["rejected"]), tok.eot_id]
        return PairTokens(prompt, chosen, rejected, margin, group)
    prompt_c, chosen = chat_completion_ids(tok, pair["prompt"], pair["chosen"], pair["where"])
    prompt_r, rejected = chat_completion_ids(tok, pair["prompt"], pair["rejected"], pair["where"])
    if prompt_c != prompt_r:  # BPE merged the header with one completion's first characters
        raise GlassboxError(
            f"{pair['where']}: the chosen and rejected answers tokenize with different "
            "prompts (one starts with blank characters that merge into the assistant "
            "header); strip leading whitespace from the answers."
        )
    return PairTokens(prompt_c, chosen, rejected, margin, group)


def chat_completion_ids(
    tok, prompt: list[dict[str, str]], completion: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion is what encode_conversation learns
    after the prompt's turns (content + end of turn); the prompt is everything before
    it, which is encode_prompt's ids."""
    before = len(encode_conversation(tok, prompt).ids)
    full = encode_conversation(tok, [*prompt, *completion])
    learned = [i for i in range(before, len(full.ids)) if full.loss_mask[i]]
    if not learned:
        raise GlassboxError(f"{where}: the assistant answer renders to no tokens.")
    return full.ids[: learned[0]], full.ids[learned[0] : learned[-1] + 1]


def fit_pair(pair: PairTokens, max_len: int) -> PairTokens | None:
    """``pair`` within ``max_len`` tokens per sequence: the prompt cut from the left, or
    None (drop it) when the longer completion leaves under MIN_PROMPT_TOKENS of prompt."""
    room = max_len - max(len(pair.chosen), len(pair.rejected))
    if room < min(MIN_PROMPT_TOKENS, len(pair.prompt)):
        return None
    if len(pair.prompt) <= room:
        return pair
    return dataclasses.replace(pair, prompt=pair.prompt[-room:])


def tokenize_pairs(tok, pairs: Sequence[dict], max_len: int) -> tuple[list[PairTokens], int]:
    """Tokenize and fit every pair; returns (pairs kept, number dropped as too long)."""
    kept = [fit_pair(encode_pair(tok, p), max_len) for p in pairs]
    out = [p for p in kept if p is not None]
    return out, len(kept) - len(out)


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """N pairs as 2N right-padded rows: chosen rows 0..N-1, rejected rows N..2N-1."""

    ids: torch.Tensor  # (2N, L) long
    attention_mask: torch.Tensor  # (2N, L) bool, real tokens
    completion_mask: torch.Tensor  # (2N, L) bool, completion tokens
    margin: torch.Tensor  # (N,) float

    def to(self, device: torch.device) -> PairBatch:
        """The batch on ``device``."""
        return PairBatch(*(t.to(device) for t in (self.ids, self.attention_mask,
                                                  self.completion_mask, self.margin)))  # fmt: skip

    @property
    def tokens(self) -> int:
        """Real tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(pairs: Sequence[PairTokens], pad_id: int) -> PairBatch:
    """Stack pairs into a :class:`PairBatch`, padded to the longest row."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    L = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.bool)
    completion = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (prompt, answer) in enumerate(rows):
        n, m = len(prompt), len(answer)
        ids[i, : n + m] = torch.tensor(prompt + answer)
        attention[i, : n + m] = True
        completion[i, n : n + m] = True
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return PairBatch(ids, attention, completion, margin)


def batches(pairs: Sequence[PairTokens], size: int, pad_id: int) -> list[PairBatch]:
    """``pairs`` in order, ``size`` at a time (for evaluation)."""
    return [collate(pairs[i : i + size], pad_id) for i in range(0, len(pairs), size)]


def sample_batch(
    pairs: Sequence[PairTokens], size: int, pad_id: int, gen: torch.Generator
) -> PairBatch:
    """``size`` pairs drawn without replacement with ``gen`` (saved in snapshots)."""
    pick = torch.randperm(len(pairs), generator=gen)[: min(size, len(pairs))]
    return collate([pairs[i] for i in pick.tolist()], pad_id)


# --------------------------------------------------------------------------------------
# Training and held-out pairs of a run
# --------------------------------------------------------------------------------------


@dataclass
class PreferenceSets:
    """A run's tokenized training and held-out pairs, and how many were too long."""

    train: list[PairTokens]
    val: list[PairTokens]
    dropped: int

    def counts(self) -> dict[str, int]:
        """Pairs trained on, held out, and dropped as too long (for records and reports)."""
        return {"train_pairs": len(self.train), "val_pairs": len(self.val), "dropped": self.dropped}


def load_preference_sets(cfg: PreferenceDataConfig, tok, context: int, seed: int):
    """Training and held-out pairs for ``cfg`` (see :class:`PreferenceDataConfig`),
    tokenized and fitted into ``cfg.max_len`` (default ``context``) tokens."""
    max_len = cfg.max_len or context
    if max_len > context:
        raise GlassboxError(
            f"--max-len={max_len} exceeds the model's context of {context} tokens; "
            f"use --max-len {context} or less."
        )
    train = load_pairs(cfg.data, "train", cfg.noise, seed)
    if cfg.eval_data:
        val = load_pairs(cfg.eval_data, "heldout")
    elif cfg.data == BUILTIN or cfg.data in WORLD_PUSHBACK:
        val = load_pairs(cfg.data, "heldout")  # fixed held-out pairs: comparable runs
    else:
        train, val = split_pairs(train, cfg.val_fraction, seed)
    train_t, dropped_t = tokenize_pairs(tok, train, max_len)
    val_t, dropped_v = tokenize_pairs(tok, val, max_len)
    if not train_t or not val_t:
        raise GlassboxError(
            f"No preference pair fits in --max-len={max_len} tokens ({len(train)} training, "
            f"{len(val)} held-out pairs read); raise --max-len or shorten the pairs."
        )
    return PreferenceSets(train_t, val_t, dropped_t + dropped_v)
