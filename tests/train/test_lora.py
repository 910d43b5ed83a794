"""LoRA: zero update at the start, exact merge, only adapters train, parity with peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.train.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state,
    lora_layers,
    lora_state,
    merge_lora,
    merged_state,
    unmerge_lora,
)


def _models() -> tuple[Transformer, Transformer]:
    """A base model and a LoRA copy of it (same weights)."""
    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_name("test", vocab_size=97))
    adapted = Transformer(base.cfg)
    adapted.load_state_dict(base.state_dict())
    apply_lora(adapted, rank=4, alpha=8.0)
    return base.eval(), adapted.eval()


def _randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05)


def test_first_forward_equals_the_base_and_only_adapters_train():
    base, adapted = _models()
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(adapted(x), base(x))  # B = 0: the update is exactly zero
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_layers(adapted)) == 7 * base.cfg.n_layer
    frozen = {n: p.clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    adapted(x).logsumexp(-1).mean().backward()
    opt.step()
    for n, p in adapted.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(adapted).values())


def test_merge_unmerge_round_trip_and_merged_logits_equal_adapter_logits():
    base, adapted = _models()
    _randomize_b(adapted)
    x = torch.randint(0, 97, (2, 16))
    before = {n: p.clone() for n, p in adapted.state_dict().items()}
    with torch.no_grad():
        y_adapter = adapted(x)
        assert not torch.allclose(y_adapter, base(x), atol=1e-3)  # the update does something
        merge_lora(adapted)
        y_merged = adapted(x)
        merge_lora(adapted)  # idempotent
    torch.testing.assert_close(y_merged, y_adapter, rtol=1e-5, atol=1e-5)
    unmerge_lora(adapted)
    for n, p in adapted.state_dict().items():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    # merged_state is a plain model's weights: a Transformer without LoRA loads it strictly
    plain = Transformer(base.cfg).eval()
    missing, unexpected = plain.load_state_dict(merged_state(adapted), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied head left out
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y_adapter, rtol=1e-5, atol=1e-5)


def test_lora_state_round_trips_into_a_fresh_adapter():
    _, adapted = _models()
    _randomize_b(adapted)
    saved = lora_state(adapted)
    assert set(saved) == {f"{n}.lora_{ab}" for n in lora_layers(adapted) for ab in "AB"}
    _, other = _models()
    load_lora_state(other, saved)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(other(x), adapted(x), rtol=0, atol=0)
    with pytest.raises(GlassboxError, match="does not fit"):
        load_lora_state(other, {k: v for k, v in saved.items() if "q_proj" not in k})


def test_bad_settings_are_refused():
    base, adapted = _models()
    with pytest.raises(GlassboxError, match="--lora-rank=0"):
        apply_lora(Transformer(base.cfg), rank=0, alpha=1.0)
    with pytest.raises(GlassboxError, match="matched no linear"):
        apply_lora(Transformer(base.cfg), rank=2, alpha=1.0, targets=["nope"])
    with pytest.raises(GlassboxError, match="ties its LM head"):
        apply_lora(Transformer(base.cfg), rank=2, alpha=1.0, targets=["lm_head"])
    with pytest.raises(GlassboxError, match="already has LoRA"):
        apply_lora(adapted, rank=2, alpha=1.0)


def test_one_layer_matches_peft_with_the_same_weights():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    linear = nn.Linear(12, 10, bias=True)
    ref = peft.get_peft_model(
        nn.Sequential(nn.Linear(12, 10, bias=True)),
        peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0),
    )
    inner = ref.base_model.model[0]
    with torch.no_grad():
        inner.base_layer.weight.copy_(linear.weight)
        inner.base_layer.bias.copy_(linear.bias)
    ours = LoRALinear(linear, rank=3, alpha=6.0)
    with torch.no_grad():
        ours.lora_B.normal_()
        inner.lora_A["default"].weight.copy_(ours.lora_A)  # (r, in)
        inner.lora_B["default"].weight.copy_(ours.lora_B)  # (out, r)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
        ref.merge_adapter()
        ours.merge()
        torch.testing.assert_close(ours.base.weight, inner.base_layer.weight, rtol=0, atol=1e-6)
