"""The transformer, in one file: a decoder-only model in the Llama layout.

    tokens -> embedding -> [RMSNorm -> attention (RoPE, GQA, SDPA) -> +residual
                            RMSNorm -> SwiGLU MLP -> +residual] x n_layer
           -> RMSNorm -> LM head -> logits over the vocabulary

Shapes: B batch, T new tokens, S attended positions, C d_model, H heads,
K key/value heads, D head dim, V vocabulary.

Incremental decoding keeps each layer's keys and values in a :class:`KVCache`; every
cache row is one sequence, and each row carries its own positions, so rows at
different lengths can decode together in one forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.checkpoint import Loaded, load_weights, register_loader
from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError


class KVCache:
    """Preallocated keys/values for ``batch_size`` sequences of up to ``max_len`` tokens.

    Stored as (n_layer, batch, max_len, K, D) so a row/position pair indexes one slot.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg.context_length
        shape = (cfg.n_layer, batch_size, self.max_len, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self,
        layer: int,
        k: torch.Tensor,  # (B, K, T, D)
        v: torch.Tensor,  # (B, K, T, D)
        input_pos: torch.Tensor,  # (B, T)
        rows: torch.Tensor | None,  # (B,) cache rows, None = rows 0..B-1 in order
        span: int,  # attend over positions [0, span)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at their positions; return all keys/values (B, K, S, D)."""
        B, _, T, _ = k.shape
        row_idx = (
            (torch.arange(B, device=k.device) if rows is None else rows).view(B, 1).expand(B, T)
        )
        self.k[layer].index_put_((row_idx, input_pos), k.transpose(1, 2))
        self.v[layer].index_put_((row_idx, input_pos), v.transpose(1, 2))
        if rows is None:  # rows 0..B-1: slice views, no gather
            k_all, v_all = self.k[layer, :B, :span], self.v[layer, :B, :span]
        else:
            k_all, v_all = self.k[layer, rows, :span], self.v[layer, rows, :span]
        return k_all.transpose(1, 2), v_all.transpose(1, 2)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (context_length, D) for rotary embeddings, half-split layout."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))
    pos = torch.arange(cfg.context_length, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by position-dependent angles. x: (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask, causal: bool, gqa: bool) -> torch.Tensor:
    """SDPA. Half-precision weights on a CPU (``--dtype bf16|fp16``) attend in fp32:
    softmax in fp32, and CPU half SDPA kernels are 3-6x slower than fp32's at decode
    sizes; the cast is cheap next to the weights. Autocast (training) is left alone."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and q.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (B, 1, T, D) or (T, D)
        sin: torch.Tensor,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,  # (B, T)
        rows: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,  # (B, 1, T, S) bool, True = may attend
        span: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B,H,T,D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B,K,T,D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if cache is None:  # causal, or the packed-sequence mask when one is given
            y = attention(q, k, v, mask, mask is None, gqa)
        else:
            k, v = cache.update(self.layer, k, v, input_pos, rows, span)  # (B,K,S,D)
            y = attention(q, k, v, mask, False, gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B,T,C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, input_pos=None, rows=None, mask=None, span=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, input_pos, rows, mask, span)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,  # (B, T) positions; default 0..T-1
        rows: torch.Tensor | None = None,  # (B,) cache rows for these sequences
        last_only: bool = False,  # logits for the last position only (prefill)
        segment_ids: torch.Tensor | None = None,  # (B, T) packed sequences, see hidden()
        embeds: torch.Tensor | None = None,  # (B, T, C) input vectors instead of embed(idx)
    ) -> torch.Tensor:
        x = self.hidden(idx, cache, input_pos, rows, segment_ids, embeds)  # (B, T, C)
        if last_only:  # a prefill needs one row of logits, not T (the LM head is large)
            x = x[:, -1:]
        return self.lm_head(x)  # (B, T, V), or (B, 1, V) with last_only

    def hidden(
        self,
        idx: torch.Tensor,  # (B, T) token ids
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,  # (B, T) positions; default 0..T-1
        rows: torch.Tensor | None = None,  # (B,) cache rows for these sequences
        segment_ids: torch.Tensor | None = None,  # (B, T) which packed sequence, or None
        embeds: torch.Tensor | None = None,  # (B, T, C) input vectors, or None
    ) -> torch.Tensor:
        """The final normalized hidden states (B, T, C), before the LM head (reward and
        value heads read these).

        ``segment_ids`` packs several sequences into one row: a token attends only to
        earlier tokens with the same id, and ``input_pos`` should restart at 0 for each
        sequence, so a packed row computes exactly what the sequences would alone.

        ``embeds`` replaces the token embeddings ``embed(idx)`` (a vision-language model
        splices image vectors in at its image positions); ``idx`` still gives the shape.
        """
        B, T = idx.shape
        x = self.embed(idx) if embeds is None else embeds  # (B, T, C)
        mask, span = None, 0
        if cache is None and input_pos is None and segment_ids is None:
            if T > self.cfg.context_length:
                raise ValueError(f"sequence length {T} > context {self.cfg.context_length}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            if input_pos is None:
                input_pos = torch.arange(T, device=idx.device).expand(B, T)
            cos = self.rope_cos[input_pos].unsqueeze(1)  # (B, 1, T, D)
            sin = self.rope_sin[input_pos].unsqueeze(1)
            if cache is not None:
                span = int(input_pos.max()) + 1
                key_pos = torch.arange(span, device=idx.device)
                mask = (key_pos.view(1, 1, span) <= input_pos.unsqueeze(-1)).unsqueeze(1)
            elif segment_ids is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)  # (B, T, T)
                mask = (same & causal).unsqueeze(1)  # (B, 1, T, T)
        for block in self.layers:
            x = block(x, cos, sin, cache, input_pos, rows, mask, span)
        return self.norm(x)


def read_config_and_tokenizer(path: Path, record: dict):
    """The model config of a checkpoint's record and its tokenizer.json, checked to fit
    each other (every language-model-shaped checkpoint starts here)."""
    from glassbox.tokenizer import Tokenizer

    try:
        cfg = ModelConfig.from_dict(record["model"])
    except TypeError as e:
        raise GlassboxError(f"{path / 'config.json'} has an invalid model config: {e}") from e
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GlassboxError(
            f"tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}; the two files are from different runs."
        )
    return cfg, tokenizer


@register_loader("transformer")
def _load_transformer(path: Path, record: dict, device: torch.device) -> Loaded:
    """A language-model checkpoint: config.json + model.safetensors + tokenizer.json."""
    cfg, tokenizer = read_config_and_tokenizer(path, record)
    with torch.device(device):
        model = Transformer(cfg)
    load_weights(model, path / "model.safetensors", device, cfg.tie_embeddings)
    return Loaded(model.eval(), tokenizer, record, "transformer")
