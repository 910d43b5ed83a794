"""What a language model does at one step, made visible: the next-token distribution
before and after each sampling filter, and the attention weights of every head.

    token ids --model--> logits (V,) --temperature--> --top-k--> --top-p--> --min-p-->
              softmax at each stage: which tokens survive, how the mass moves, entropy

The filters are :func:`glassbox.infer.sampling.filter_logits`, the engine's own, so
"after filters" is exactly the distribution the engine draws from. The attention weights
come from :func:`attention_maps`, a layer-by-layer pass that computes softmax(q k^T / sqrt(D))
explicitly (the model itself calls fused scaled-dot-product attention, which never
materialises the weights); it returns the final hidden state too, so a test can check that
the explicit weights reproduce the model's own output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glassbox.infer.sampling import SamplingParams, filter_logits, inverse_cdf
from glassbox.model import Transformer, apply_rope


@dataclass
class Candidate:
    """One token among the top candidates of a step."""

    id: int
    logit: float
    p_raw: float  # softmax of the raw logits (temperature 1, no filters)
    p_temperature: float  # after temperature only
    p_final: float  # after temperature, top-k, top-p, min-p (renormalised); 0 if filtered
    kept: bool  # survives every filter
    dropped_by: str | None  # the first filter that removed it: "top_k", "top_p", "min_p"


@dataclass
class StepDistribution:
    """The next-token distribution of one step, stage by stage."""

    candidates: list[Candidate]  # the top_n by raw logit, most likely first
    survivors: int  # tokens with non-zero probability after all filters
    entropy_raw: float  # nats, of the raw distribution
    entropy_final: float  # nats, of the distribution sampled from
    chosen: int  # the token drawn (argmax at temperature 0)
    log_probs_final: torch.Tensor  # (V,) log-softmax after filters (-inf where filtered)


def entropy(log_p: torch.Tensor) -> float:
    """Shannon entropy in nats of a log-distribution (-inf entries contribute 0)."""
    p = log_p.exp()
    return float(-(p * log_p.masked_fill(p == 0, 0.0)).sum())


@torch.no_grad()
def next_token_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Raw logits (V,) for the token after ``ids`` (one forward pass, no cache)."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    return model(x, last_only=True)[0, -1].float().cpu()  # (V,)


def step_distribution(
    logits: torch.Tensor,  # (V,) raw logits, padding rows of the LM head already cut off
    params: SamplingParams,
    top_n: int = 20,
    generator: torch.Generator | None = None,
) -> StepDistribution:
    """The distribution at each stage and one draw from the final one, as the engine
    would draw it (same filters, same inverse-CDF draw; argmax at temperature 0)."""
    row = logits.float().view(1, -1)  # (1, V)
    log_raw = row.log_softmax(-1)[0]
    log_temp = (row / max(params.temperature, 1e-5)).log_softmax(-1)[0]
    t = params.temperature
    after_k = filter_logits(row, t, params.top_k, 1.0, 0.0)
    after_p = filter_logits(row, t, params.top_k, params.top_p, 0.0)
    final = filter_logits(row, t, params.top_k, params.top_p, params.min_p)  # (1, V)
    log_final = final.log_softmax(-1)[0]
    if params.greedy:
        chosen = int(row.argmax())
    else:
        u = torch.rand(1, generator=generator)
        chosen = int(inverse_cdf(final.softmax(-1), u)[0])
    top = torch.topk(row[0], min(top_n, row.shape[-1]))
    cands = []
    for logit, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        dropped = None
        if not torch.isfinite(after_k[0, i]):
            dropped = "top_k"
        elif not torch.isfinite(after_p[0, i]):
            dropped = "top_p"
        elif not torch.isfinite(final[0, i]):
            dropped = "min_p"
        cands.append(
            Candidate(
                id=i, logit=logit, p_raw=float(log_raw[i].exp()),
                p_temperature=float(log_temp[i].exp()), p_final=float(log_final[i].exp()),
                kept=dropped is None, dropped_by=dropped,
            )
        )  # fmt: skip
    return StepDistribution(
        candidates=cands,
        survivors=int(torch.isfinite(final).sum()),
        entropy_raw=entropy(log_raw),
        entropy_final=entropy(log_final),
        chosen=chosen,
        log_probs_final=log_final,
    )


@torch.no_grad()
def attention_maps(model: Transformer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights of every layer and head for one sequence, and the final hidden
    states. Returns (weights (L, H, T, T), hidden (T, C)); row q of a head's map is the
    distribution over keys 0..q the query attends with (causal: zero above the diagonal).

    The pass mirrors ``Transformer.hidden`` block by block, with the attention written
    out: scores = q k^T / sqrt(D), causal mask, softmax, then weights @ v.
    """
    dev = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, D)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    x = model.embed(idx)  # (1, T, C)
    maps = []
    for block in model.layers:
        a = block.attn
        h = block.attn_norm(x)
        q = a.q_proj(h).view(1, T, a.n_head, a.head_dim).transpose(1, 2)  # (1, H, T, D)
        k = a.k_proj(h).view(1, T, a.n_kv_head, a.head_dim).transpose(1, 2)  # (1, K, T, D)
        v = a.v_proj(h).view(1, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = a.n_head // a.n_kv_head  # GQA: each key/value head serves `groups` heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(a.head_dim)  # (1,H,T,T)
        w = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (1, H, T, T)
        maps.append(w[0])
        y = (w.to(v.dtype) @ v).transpose(1, 2).reshape(1, T, a.n_head * a.head_dim)
        x = x + a.o_proj(y)
        x = x + block.mlp(block.mlp_norm(x))
    return torch.stack(maps).cpu(), model.norm(x)[0]
