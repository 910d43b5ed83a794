"""`ModelConfig`: the one description of a transformer's shape, with named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from glassbox.errors import GlassboxError


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer in the Llama layout.

    ``vocab_size`` is normally taken from the tokenizer when a run starts.
    """

    vocab_size: int = 4096
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    d_model: int = 128
    ffn_hidden: int | None = None  # None: about 8/3 * d_model rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * -(-int(8 * self.d_model / 3) // 32)
        checks = [
            (self.vocab_size >= 1, f"vocab_size={self.vocab_size} must be >= 1"),
            (self.context_length >= 1, f"context_length={self.context_length} must be >= 1"),
            (self.n_layer >= 1, f"n_layer={self.n_layer} must be >= 1"),
            (
                self.d_model % self.n_head == 0,
                f"d_model={self.d_model} must be divisible by n_head={self.n_head}",
            ),
            (
                self.n_head % self.n_kv_head == 0,
                f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}",
            ),
            ((self.d_model // self.n_head) % 2 == 0, "head dimension must be even for RoPE"),
        ]
        for ok, msg in checks:
            if not ok:
                raise GlassboxError(f"Invalid model config: {msg}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """A named preset, with optional field overrides (``vocab_size=...``)."""
        if name not in PRESETS:
            raise GlassboxError(
                f"Unknown model preset {name!r}. Choose one of: {', '.join(PRESETS)}."
            )
        return cls(**{**PRESETS[name], **overrides, "name": name})


# Presets from a ~100k-parameter test size to the GPT-2-124M scale and beyond. The
# "gpt2-124m" preset keeps GPT-2 small's width, depth, heads, context and vocabulary;
# its SwiGLU hidden size (2048, three matrices) matches GPT-2's 4x MLP (two matrices).
PRESETS: dict[str, dict] = {
    "test": dict(vocab_size=256, context_length=64, n_layer=2, n_head=4, d_model=64),
    "tiny": dict(vocab_size=4096, context_length=256, n_layer=4, n_head=4, d_model=128),
    "small": dict(vocab_size=8192, context_length=512, n_layer=6, n_head=6, d_model=384),
    "gpt2-124m": dict(
        vocab_size=50304,
        context_length=1024,
        n_layer=12,
        n_head=12,
        d_model=768,
        ffn_hidden=2048,
    ),
    "gpt2-350m": dict(
        vocab_size=50304,
        context_length=1024,
        n_layer=24,
        n_head=16,
        d_model=1024,
        ffn_hidden=2816,
    ),
    "llama-1b": dict(
        vocab_size=32000,
        context_length=2048,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        d_model=2048,
        ffn_hidden=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
}


def fit_to_corpus(corpus_bytes: int, preset: str) -> tuple[int, int, str]:
    """Vocabulary size and context length for a corpus of ``corpus_bytes`` (UTF-8).

    A 1 MB corpus (tinyshakespeare) overfits with a 4096-token vocabulary and a
    256-token context: the rare merges are seen a handful of times and validation bpb
    rises after ~400 steps. The rule, powers of two:

        vocab   = 2 ** round(log2(sqrt(bytes)))       at most the preset's vocab, at least 512
        context = 2 ** round(log2(sqrt(bytes) / 8))   within [64, the preset's context]

    1.1 MB -> vocab 1024, context 128; 11.5 MB (builtin:stdlib) -> 4096, 256 with the
    tiny preset (its caps), as before. Returns (vocab, context, why).
    """
    base = PRESETS[preset] if preset in PRESETS else PRESETS["tiny"]
    root = max(1.0, float(corpus_bytes)) ** 0.5
    vocab = max(512, min(2 ** round(math.log2(root)), base["vocab_size"]))
    context = min(max(64, 2 ** round(math.log2(max(1.0, root / 8)))), base["context_length"])
    why = f"fitted to the {corpus_bytes / 1e6:.1f} MB corpus (docs/pretraining.md)"
    return vocab, context, why
