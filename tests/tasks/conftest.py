"""A tokenizer trained on task text and tiny models, built in-process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glassbox.config import ModelConfig
from glassbox.conversation import encode_conversation
from glassbox.model import Transformer
from glassbox.tasks import builtin_tasks
from glassbox.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The machine's cores are shared: one intra-op thread is ~30x faster for these tiny
    models than two threads spinning against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def task_tok() -> Tokenizer:
    text = " ".join(f"{t.prompt} {t.reference}" for t in builtin_tasks("train", train_size=60))
    return Tokenizer.train([text], vocab_size=400, show_progress=False)


def tiny_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    """A random 2-layer model with a 128-token context."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size, context_length=128)
    return Transformer(cfg).eval()


def overfit(model, tok, conversations, steps: int, stop_loss: float) -> None:
    """Train ``model`` on the conversations' assistant tokens until it reproduces them
    (loss under ``stop_loss``) or ``steps`` run out."""
    convs = [encode_conversation(tok, c) for c in conversations]
    width = max(len(c.ids) for c in convs)
    ids = torch.zeros(len(convs), width, dtype=torch.long)
    mask = torch.zeros(len(convs), width)
    for i, c in enumerate(convs):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
        mask[i, : len(c.ids)] = torch.tensor(c.loss_mask, dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        nll = F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_loss:
            break
    model.eval()
