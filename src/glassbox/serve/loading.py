"""Served models: a checkpoint's engine, tokenizer and grammar compiler under one name.

``glassbox serve runs/base sft=runs/sft`` -> {"base": ServedModel, "sft": ServedModel}.
A vision-language run (``glassbox vlm train``) is a ServedModel whose engine runs its
language model and whose ``vision`` model turns image parts into prompt vectors; a
contrastive run (``glassbox clip train``) is a :class:`ServedEncoder`, for /v1/embeddings.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.infer.engine import AsyncEngine, Engine
from glassbox.infer.structured import GrammarCompiler
from glassbox.tokenizer import Tokenizer

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ServedModel:
    """One checkpoint being served under ``name``."""

    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    compiler: GrammarCompiler
    created: int = field(default_factory=lambda: int(time.time()))
    # A VisionLanguageModel whose .lm is the engine's model: chat requests may carry images.
    vision: Any = None
    _token_text: dict[int, tuple[str, list[int]]] = field(default_factory=dict, repr=False)

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token for logprobs, cached: a request with n=16 and
        top-5 logprobs looks up thousands of tokens, mostly the same few hundred."""
        hit = self._token_text.get(token)
        if hit is None:
            raw = self.compiler.token_bytes(token)
            hit = self._token_text[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    @property
    def context_length(self) -> int:
        return self.engine.engine.context_length

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.vocab_size

    @property
    def max_seqs(self) -> int:
        return self.engine.engine.max_seqs

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eot_id, self.tokenizer.end_id})

    @classmethod
    def from_engine(cls, name: str, engine: Engine, max_queue: int = 64) -> ServedModel:
        """Wrap an engine (it must have a tokenizer) for serving."""
        tok = engine.tokenizer
        if tok is None:
            raise GlassboxError("A served engine needs a tokenizer.")
        compiler = GrammarCompiler(tok, engine.vocab_size, [tok.end_id, tok.eot_id])
        return cls(name, AsyncEngine(engine, max_queue), tok, compiler)


@dataclass
class ServedEncoder:
    """A contrastive image-text run served under ``name``: /v1/embeddings only."""

    name: str
    model: Any  # glassbox.vision.clip.ClipModel
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        """Words one text may have (the text encoder's window)."""
        return self.model.config.max_text_len


def engine_alive(engine: AsyncEngine) -> bool:
    """Whether the engine's thread is running (False before start and after a crash)."""
    return engine.alive


def engine_counters(engine: AsyncEngine) -> dict[str, int]:
    """An engine's load, read lock-free from any thread."""
    return {
        "free_slots": engine.free_slots,
        "num_waiting": engine.num_waiting,
        "num_running": engine.num_running,
        "queue_depth": engine.queue_depth,
    }


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'runs/base' -> ('base', 'runs/base'); 'name=runs/base' -> ('name', 'runs/base').

    A spec is split at '=' only when the left side is a valid name and the whole spec
    is not an existing path, so a checkpoint directory whose path has '=' still works.
    """
    left, eq, right = spec.partition("=")
    if eq and _NAME.fullmatch(left) and right and not Path(spec).exists():
        return left, right
    return Path(spec).resolve().name, spec


def load_for_decoding(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[str], object] | None = print,
    batch: int = 1,
):
    """A checkpoint's model and tokenizer, cast to the precision ``dtype`` chooses
    (``auto`` measures this machine at batch 1 and at ``batch`` sequences, see
    glassbox.infer.precision); returns (model, tokenizer, PrecisionChoice). What
    generate, chat and serve load with."""
    from glassbox.checkpoint import load_model_dir
    from glassbox.device import resolve_device
    from glassbox.infer.precision import CHOICES, check_name, prepare_model

    check_name(dtype, CHOICES, "--dtype")  # a typo fails before the weights are read
    model, tok, _ = load_model_dir(path, resolve_device(device))
    model, choice = prepare_model(model, tok, dtype, log=log, batch=batch)
    return model, tok, choice


def load_served_models(
    specs: list[str],
    device: str = "auto",
    max_seqs: int = 16,
    max_queue: int = 64,
    dtype: str = "auto",
    max_batched_tokens: int = 256,
    compile: str = "off",
) -> dict[str, ServedModel | ServedEncoder]:
    """``runs/base`` or ``name=runs/base`` -> a ServedModel named ``base`` (or ``name``),
    its language model in the precision ``dtype`` chooses; the Engine options as
    documented there. Vision-language runs keep their image encoder in fp32 beside the
    engine; contrastive runs become ServedEncoders."""
    from glassbox.checkpoint import load_checkpoint
    from glassbox.device import resolve_device
    from glassbox.infer.precision import CHOICES, check_name, prepare_model

    check_name(dtype, CHOICES, "--dtype")
    models: dict[str, ServedModel | ServedEncoder] = {}
    for spec in specs:
        name, path = parse_model_spec(spec)
        if name in models:
            raise GlassboxError(f"Two models are named {name!r}; use NAME=PATH to rename one.")
        loaded = load_checkpoint(path, resolve_device(device))
        if loaded.architecture == "clip":
            models[name] = ServedEncoder(name, loaded.model)
            continue
        if loaded.architecture not in ("transformer", "vlm"):
            raise GlassboxError(
                f"{path} holds a {loaded.architecture!r} checkpoint (stage "
                f"{loaded.record.get('stage')!r}); serve a language model, a `glassbox vlm "
                "train` run or a `glassbox clip train` run."
            )
        vision = loaded.model if loaded.architecture == "vlm" else None
        lm = vision.lm if vision is not None else loaded.model
        tok = loaded.tokenizer
        lm, _ = prepare_model(
            lm, tok, dtype, log=lambda s, n=name: print(f"{n}: {s}"), batch=max_seqs
        )
        if vision is not None:
            vision.lm = lm
        engine = Engine(
            lm, tok, max_seqs=max_seqs, max_batched_tokens=max_batched_tokens, compile=compile
        )
        models[name] = ServedModel.from_engine(name, engine, max_queue)
        models[name].vision = vision
    return models
