import torch
import torch.nn.functional as F

from glassbox.config import PRESETS, ModelConfig
from glassbox.model import KVCache, Transformer


def test_causality_future_tokens_never_change_past_logits(tiny_model, tiny_cfg):
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = tiny_model(x), tiny_model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_kv_cache_decoding_equals_full_forward(tiny_cfg):
    for n_kv in (4, 2, 1):  # multi-head, grouped-query, multi-query
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("test", vocab_size=tiny_cfg.vocab_size, n_kv_head=n_kv)
        model = Transformer(cfg).eval()
        x = torch.randint(0, cfg.vocab_size, (2, 30))
        with torch.no_grad():
            full = model(x)
            cache = KVCache(cfg, 2)
            steps = [model(x[:, :10], cache=cache)]
            for t in range(10, 30):
                pos = torch.full((2, 1), t)
                steps.append(model(x[:, t : t + 1], cache=cache, input_pos=pos))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_last_only_logits_equal_the_last_row(tiny_model, tiny_cfg):
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = tiny_model(x)
        last = tiny_model(x, cache=KVCache(tiny_cfg, 2), last_only=True)
    assert last.shape == (2, 1, tiny_cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_ragged_rows_decode_together(tiny_model, tiny_cfg):
    """Two sequences of different lengths in cache rows 2 and 0 decode in one pass."""
    a = torch.randint(0, tiny_cfg.vocab_size, (1, 7))
    b = torch.randint(0, tiny_cfg.vocab_size, (1, 12))
    with torch.no_grad():
        cache = KVCache(tiny_cfg, 3)
        tiny_model(a, cache=cache, rows=torch.tensor([2]))
        tiny_model(b, cache=cache, rows=torch.tensor([0]))
        nxt = torch.tensor([[5], [9]])
        pos = torch.tensor([[7], [12]])
        both = tiny_model(nxt, cache=cache, input_pos=pos, rows=torch.tensor([2, 0]))
        ref_a = tiny_model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = tiny_model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(both[0, -1], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, -1], ref_b[0], atol=1e-5, rtol=1e-5)


def test_tiny_model_overfits_one_batch(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg)
    x = torch.randint(0, tiny_cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.1


def test_presets_and_parameter_counts():
    test = Transformer(ModelConfig.from_name("test"))
    assert 90_000 <= test.num_params() <= 150_000
    with torch.device("meta"):
        gpt2 = Transformer(ModelConfig.from_name("gpt2-124m"))
    assert 115e6 <= gpt2.num_params() <= 130e6
    assert {"test", "tiny", "small", "gpt2-124m"} <= set(PRESETS)


def test_untied_head_is_separate():
    cfg = ModelConfig.from_name("test", tie_embeddings=False)
    m = Transformer(cfg)
    assert m.lm_head.weight.data_ptr() != m.embed.weight.data_ptr()
    assert m.num_params() == Transformer(ModelConfig.from_name("test")).num_params() + 256 * 64


def test_packed_sequences_compute_what_they_would_alone():
    """segment_ids + per-sequence positions: a packed row equals the unpacked rows."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("test", vocab_size=256)).eval()
    a, b = torch.randint(0, 256, (1, 10)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 10 + [1] * 7])
    pos = torch.tensor([list(range(10)) + list(range(7))])
    out = model(packed, input_pos=pos, segment_ids=seg)
    torch.testing.assert_close(out[:, :10], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 10:], model(b), atol=1e-5, rtol=1e-5)
    # without the segment mask the second sequence would see the first
    leaky = model(packed, input_pos=pos)
    assert (leaky[:, 10:] - model(b)).abs().max() > 1e-3
