"""Per-token log-probabilities agree with a plain log-softmax, and padding is inert."""

from __future__ import annotations

import torch

from glassbox.config import ModelConfig
from glassbox.model import Transformer
from glassbox.train.logprobs import entropy, gather_logprobs, masked_mean, sequence_logprobs


def test_gather_matches_log_softmax_and_entropy_is_bounded():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, ids), want)
    h = entropy(logits)
    assert h.shape == (3, 5) and (h > 0).all() and (h <= torch.log(torch.tensor(11.0))).all()


def test_right_padding_does_not_change_a_sequence_s_scores():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("test", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    alone, with_pad = sequence_logprobs(model, ids), sequence_logprobs(model, padded)
    torch.testing.assert_close(with_pad[:, :8], alone)


def test_masked_mean_ignores_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
