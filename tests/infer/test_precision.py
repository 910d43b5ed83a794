"""Precision chosen by measurement: greedy parity per dtype, the probe, the fallback, the
cache, explicit choices, and the training decision."""

from __future__ import annotations

import copy

import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.device import autocast
from glassbox.errors import GlassboxError
from glassbox.infer import precision as P
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.model import Transformer

PROMPTS = ["hello world", "faults stay", "0123", "a small test of the"]


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Timings are cached only when the machine is not busy; tests pin that check."""
    monkeypatch.setattr(P, "busy", lambda: None)
    monkeypatch.setattr(P, "_BUSY_MEMO", {})


def greedy(model, tok, prompt: str, n: int = 16) -> list[int]:
    engine = Engine(model, tok, max_seqs=1)
    req = GenerationRequest(tok.encode(prompt), SamplingParams(temperature=0.0), n)
    return engine.run([req])[0][0]


@pytest.fixture(scope="module")
def smooth_model(tok) -> Transformer:
    """The usual init (std 0.02): logits closer together than with the engine tests'
    large init, so precision errors have more chances to flip a greedy choice."""
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("test", vocab_size=tok.vocab_size)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_each_precision_decodes_like_fp32(model, tok, name):
    """The engine in bf16/fp16 (KV cache in the weights' dtype, sampling in fp32) gives
    fp32's greedy tokens on the tiny model, within the documented tolerance: where they
    first differ, fp32's own top two logits are closer than MAX_REL_DIFF x logit std (a
    near tie that the half precision's rounding may break either way)."""
    half = P.cast_model(copy.deepcopy(model), name)
    assert half.embed.weight.dtype == P.DTYPES[name]
    engine = Engine(half, tok, max_seqs=1)
    assert engine.cache.k.dtype == P.DTYPES[name]
    exact = 0
    for prompt in PROMPTS:
        ours, ref = greedy(half, tok, prompt), greedy(model, tok, prompt)
        assert len(ours) == len(ref)
        i = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), None)
        if i is None:
            exact += 1
            continue
        assert name != "fp32", (prompt, i)
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(prompt) + ref[:i]]))[0, -1]
        gap = float(logits[ref[i]] - logits[ours[i]])
        assert 0 <= gap <= P.MAX_REL_DIFF * float(logits.std()), (prompt, i, gap)
    assert exact >= len(PROMPTS) - 1  # at most one near tie among the prompts


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_probe_passes_the_documented_tolerance(smooth_model, tok, name):
    ids = P.probe_ids(smooth_model, tok)
    ref_tokens, ref_logits = P.fp32_reference(smooth_model, ids, P.PROBE_TOKENS)
    before = [p.clone() for p in smooth_model.parameters()]
    with P.cast_temporarily(smooth_model, P.DTYPES[name]):
        probe = P.compare(smooth_model, ids, ref_tokens, ref_logits)
    # the model is fp32 again, with the very same values
    assert all(p.dtype == torch.float32 for p in smooth_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, smooth_model.parameters(), strict=True))
    assert probe.total == P.PROBE_TOKENS
    assert P.default_check(probe) is None, probe.summary()
    assert 0 < probe.rel_diff <= P.MAX_REL_DIFF


def fake_speeds(cache_dir, model, fp32=3.0, bf16=1.0, fp16=0.5) -> None:
    """Seed the timing cache as if half precision were much faster on this machine."""
    shapes = P.linear_shapes(model)
    P.cached_timings("decode", shapes, cache_dir, lambda: dict(fp32=fp32, bf16=bf16, fp16=fp16))


def test_auto_takes_the_fastest_that_passes(model, tok, tmp_path):
    fake_speeds(tmp_path, model)
    lines: list[str] = []
    choice = P.choose_dtype(model, tok, "auto", cache_dir=tmp_path, log=lines.append)
    assert choice.name == "fp16" and choice.dtype == torch.float16
    assert lines == [choice.line()]
    assert lines[0].startswith("dtype auto: fp16 (6.0x faster matvec than fp32")
    assert "greedy agreement 16/16" in lines[0]
    assert model.embed.weight.dtype == torch.float32  # choosing does not cast
    # fp16 failing its check: bf16, the next fastest, is taken
    only_bf16 = P.choose_dtype(
        model, tok, cache_dir=tmp_path, log=None,
        check=lambda probe: "simulated" if probe.name == "fp16" else None,
    )  # fmt: skip
    assert only_bf16.name == "bf16" and set(only_bf16.probes) == {"fp16", "bf16"}


def test_auto_falls_back_to_fp32_when_every_candidate_fails(model, tok, tmp_path):
    fake_speeds(tmp_path, model)
    choice = P.choose_dtype(
        model, tok, cache_dir=tmp_path, log=None, check=lambda probe: "simulated failure"
    )
    assert choice.name == "fp32"
    assert set(choice.probes) == {"fp16", "bf16"}  # both were probed, fastest first
    assert "fp16 failed the accuracy probe (simulated failure)" in choice.reason
    assert "bf16 failed the accuracy probe (simulated failure)" in choice.reason
    # the default check also fails a probe that disagrees with fp32
    bad = P.Probe("bf16", agree=10, total=16, max_diff=0.01, scale=1.0)
    assert "greedy agreement 10/16" in P.default_check(bad)
    assert "logit diff" in P.default_check(P.Probe("bf16", 16, 16, 5.0, 1.0))
    assert P.default_check(P.Probe("fp16", 16, 16, float("nan"), 1.0)) is not None


def test_batched_engines_skip_a_half_precision_slow_at_their_batch(model, tok, tmp_path):
    """fp16 fastest as a matrix-vector product but slower than fp32 at 16 rows (fp16 GEMM
    without AVX-512 FP16): an engine with 16 slots takes bf16; batch 1 still fp16."""
    fake_speeds(tmp_path, model)
    shapes = P.linear_shapes(model)
    P.cached_timings("decode-16", shapes, tmp_path, lambda: dict(fp32=1.0, bf16=0.7, fp16=1.6))
    wide = P.choose_dtype(model, tok, cache_dir=tmp_path, log=None, batch=16)
    assert wide.name == "bf16" and "fp16 not taken: slower than fp32 at 16 sequences" in wide.reason
    assert P.choose_dtype(model, tok, cache_dir=tmp_path, log=None).name == "fp16"


def test_auto_keeps_fp32_when_half_is_not_faster(model, tok, tmp_path):
    fake_speeds(tmp_path, model, fp32=1.0, bf16=5.0, fp16=0.95)  # fp16 < MIN_SPEEDUP
    choice = P.choose_dtype(model, tok, cache_dir=tmp_path, log=None)
    assert choice.name == "fp32" and not choice.probes
    assert "no half precision is 1.15x faster" in choice.reason


def test_measurement_is_cached_per_machine_and_shapes(model, tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return P.measure_matvec(P.linear_shapes(model), list(P.DTYPES), repeats=1)

    shapes = P.linear_shapes(model)
    first = P.cached_timings("decode", shapes, tmp_path, measure)
    again = P.cached_timings("decode", shapes, tmp_path, measure)
    assert first == again and len(calls) == 1
    assert set(first) == {"fp32", "bf16", "fp16"} and all(t > 0 for t in first.values())
    other = {**shapes, "8x8": 1}
    P.cached_timings("decode", other, tmp_path, measure)  # other shapes: measured anew
    assert len(calls) == 2
    (tmp_path / P.CACHE_FILE).write_text("{not json")  # a damaged cache is remeasured
    P.cached_timings("decode", shapes, tmp_path, measure)
    assert len(calls) == 3


def test_timings_taken_on_a_busy_machine_are_not_kept(model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "busy", lambda: "load 8.0 on 2 CPUs")
    calls = []
    shapes = P.linear_shapes(model)
    for _ in range(2):  # kept for this process only (its decisions agree), not on disk
        P.cached_timings("decode", shapes, tmp_path, lambda: calls.append(1) or {"fp32": 1.0})
    assert len(calls) == 1 and not (tmp_path / P.CACHE_FILE).exists()


def test_real_auto_decision_is_sane(model, tok, tmp_path):
    """No faked timings: whatever this machine measures, the choice is a passing one."""
    choice = P.choose_dtype(model, tok, cache_dir=tmp_path, log=None)
    assert choice.name in P.DTYPES
    assert set(choice.timings) == {"fp32", "bf16", "fp16"}
    if choice.name != "fp32":
        assert P.default_check(choice.probes[choice.name]) is None


def test_explicit_dtype_and_errors(model, tok, tmp_path):
    fake_speeds(tmp_path, model, fp32=1.0, bf16=4.0, fp16=0.5)
    slow = P.choose_dtype(model, tok, "BF16", cache_dir=tmp_path, log=None)
    assert slow.name == "bf16" and "slower" in slow.reason and "0.25x" in slow.reason
    fast, cast = P.prepare_model(copy.deepcopy(model), tok, "fp16", cache_dir=tmp_path, log=None)
    assert cast.name == "fp16" and fast.embed.weight.dtype == torch.float16
    assert P.choose_dtype(model, tok, "fp32", log=None).reason == "as requested"
    with pytest.raises(GlassboxError, match="--dtype='fp64'.*auto, fp32, bf16, fp16"):
        P.choose_dtype(model, tok, "fp64")


def test_training_precision(model, tmp_path):
    lines: list[str] = []
    auto = P.choose_train_precision(model, 256, "cpu", cache_dir=tmp_path, log=lines.append)
    assert auto.name in ("fp32", "bf16") and set(auto.timings) == {"fp32", "bf16"}
    assert lines[0].startswith(f"precision auto: {auto.name} (") and "forward+backward" in lines[0]
    assert P.choose_train_precision(model, 256, "cpu", "fp32", log=None).name == "fp32"
    with pytest.raises(GlassboxError, match="--precision='fp16'"):
        P.choose_train_precision(model, 256, "cpu", "fp16")
    cpu = torch.device("cpu")
    x = torch.randn(4, 8)
    with autocast(cpu, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with autocast(cpu, "fp32"), autocast(cpu):
        assert (x @ x.T).dtype == torch.float32


def test_rollouts_on_a_half_precision_copy_follow_the_policy(model, tok):
    """RL rollouts (the engine's batch API) in bf16: a copy re-synced from the trained
    fp32 policy before every batch, so a weight update reaches the next rollouts."""
    from glassbox.train.finetune import RolloutConfig, rollout_engine, sample_rollouts

    policy = copy.deepcopy(model)
    engine = rollout_engine(policy, tok, RolloutConfig(rollout_dtype="bf16", max_seqs=4))
    assert engine.model is not policy and engine.model.embed.weight.dtype == torch.bfloat16
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    params = SamplingParams(temperature=0.0)
    before = sample_rollouts(engine, prompts, 2, params, 8)
    assert len(before) == 4 and all(r.tokens for r in before)
    with torch.no_grad():
        policy.lm_head.weight.mul_(-1.0)  # a "training step" that changes every choice
    after = sample_rollouts(engine, prompts, 2, params, 8)
    assert torch.equal(engine.model.lm_head.weight, policy.lm_head.weight.bfloat16())
    assert [r.tokens for r in after] != [r.tokens for r in before]
    assert rollout_engine(policy, tok, RolloutConfig(max_seqs=4)).model is policy  # fp32
