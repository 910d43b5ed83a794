"""Prompts to vectors: a word-level vocabulary over the captions and a tiny transformer.

The vocabulary is built deterministically (sorted) from the training captions and saved
in the checkpoint's JSON, so a prompt maps to the same ids forever. Words outside it
are an error that lists what the model knows, rather than a silent ``<unk>``: a model
trained on twenty words cannot follow a prompt about anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.errors import GlassboxError

PAD, BOS = "<pad>", "<bos>"
_WORD = re.compile(r"[a-z0-9]+")
NEVER_SEEN = "this model never saw in training"


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text`` (punctuation is ignored)."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id. Id 0 pads, id 1 starts every prompt (so the empty prompt has one token)."""

    def __init__(self, tokens: list[str], max_length: int = 16, known: str = NEVER_SEEN):
        if tokens[:2] != [PAD, BOS]:
            raise GlassboxError("A vocabulary must start with the <pad> and <bos> tokens.")
        self.tokens = list(tokens)
        self.index = {w: i for i, w in enumerate(self.tokens)}
        self.max_length = max_length
        self.known = known  # completes "The prompt ... has words ..." in the unknown-word error

    @classmethod
    def build(cls, captions: Iterable[str], max_length: int = 16) -> Vocabulary:
        vocab = sorted({w for c in captions for w in words(c)})
        return cls([PAD, BOS, *vocab], max_length=max_length)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, prompt: str) -> list[int]:
        """[BOS, word ids...]; unknown words or an over-long prompt raise GlassboxError."""
        ws = words(prompt)
        unknown = [w for w in ws if w not in self.index]
        if unknown:
            known = " ".join(self.tokens[2:])
            raise GlassboxError(
                f"The prompt {prompt!r} has words {self.known}: "
                f"{', '.join(repr(w) for w in unknown)}. Use only these words: {known}"
            )
        if len(ws) + 1 > self.max_length:
            raise GlassboxError(
                f"The prompt {prompt!r} has {len(ws)} words; this model reads at most "
                f"{self.max_length - 1}. Shorten the prompt."
            )
        return [self.index[BOS]] + [self.index[w] for w in ws]

    def batch(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) int64 ids, right-padded with 0."""
        out = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention over the prompt, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, L, D/heads)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): attend to real tokens only
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token + position embeddings and a few transformer blocks: ids -> per-token states."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> states (B, L, dim) and mask (B, L) True at real tokens."""
        mask = ids != 0
        x = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, L, dim)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask


class ClipTextEncoder(nn.Module):
    """The text tower of a ``glassbox clip train`` run, read per token: ids -> states.

    The same :class:`glassbox.model.Transformer` (causal, RoPE, final RMSNorm) that the
    contrastive model reads captions with, built by :class:`glassbox.vision.clip.ClipModel`
    so its shape is the contrastive run's; its weights come from that run (copied in by
    :func:`glassbox.diffusion.model.load_clip_text`) and are saved in the diffusion run.
    ``prefix`` words (the contrastive captions' "a photo of") are put after <bos>, so the
    encoder reads prompts the way it read its training captions.
    """

    def __init__(
        self, vocab: list[str], max_length: int, dim: int, layers: int, heads: int, prefix: str
    ):
        super().__init__()
        from glassbox.vision.clip import ClipConfig, ClipModel  # vision imports this module

        cfg = ClipConfig(text_dim=dim, text_layers=layers, text_heads=heads,
                         max_text_len=max_length, vocab=tuple(vocab))  # fmt: skip
        self.transformer = ClipModel(cfg).text  # the text tower only; the ViT is dropped
        ids = Vocabulary(vocab, max_length).encode(prefix)[1:]
        self.register_buffer("prefix", torch.tensor(ids, dtype=torch.long), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) = [<bos>, words..., <pad>...] -> states (B, L', dim), mask (B, L')."""
        n = int((ids != 0).sum(1).max())  # causal and masked: trailing padding changes nothing
        pre = self.prefix.to(ids.device).expand(ids.shape[0], -1)  # (B, P)
        ids = torch.cat([ids[:, :1], pre, ids[:, 1:n]], dim=1)  # (B, 1 + P + n - 1)
        return self.transformer.hidden(ids), ids != 0
