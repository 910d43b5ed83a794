"""Evaluation helpers shared by the language-model recipes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glassbox.data.tokens import TokenData
from glassbox.device import autocast


@torch.no_grad()
def language_model_loss(
    model: torch.nn.Module,
    data: TokenData,
    token_bytes: torch.Tensor,  # (V,) UTF-8 bytes per token id
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    device: torch.device,
) -> tuple[float, float]:
    """Validation loss in nats/token and bits per UTF-8 byte of the validation text.

    Bits per byte does not depend on the tokenizer, so runs with different vocabularies
    compare on it.
    """
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    for x, y in data.val_batches(batch_size, seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats += loss.sum().item()
        tokens += y.numel()
        nbytes += int(token_bytes[y.flatten()].sum())
    model.train()
    return nats / tokens, nats / math.log(2) / max(1, nbytes)
