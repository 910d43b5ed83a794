import pytest
import torch

from glassbox.errors import ContextLengthError, GlassboxError
from glassbox.infer.generate import StopStrings, fit_context, generate_text
from glassbox.infer.sampling import SamplingParams


def test_fit_context_rules():
    assert fit_context(10, 20, 64) == (10, 20)
    assert fit_context(10, None, 64) == (10, 54)  # no max: fill the rest of the context
    with pytest.raises(ContextLengthError) as e:
        fit_context(60, 10, 64)
    msg = str(e.value)
    assert "64 tokens" in msg and "60 tokens" in msg and "10 new tokens" in msg
    assert fit_context(60, 10, 64, truncate=True) == (54, 10)  # keep the newest 54
    with pytest.raises(ContextLengthError):
        fit_context(64, None, 64)
    with pytest.raises(GlassboxError, match="max_new_tokens=64"):
        fit_context(10, 64, 64, truncate=True)
    with pytest.raises(GlassboxError, match="empty"):
        fit_context(0, 5, 64)


def test_greedy_matches_argmax_of_full_forward(tiny_model, tokenizer):
    prompt = [1, 50, 60, 70]
    out = generate_text(tiny_model, tokenizer, prompt, 12, SamplingParams(temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(tiny_model(torch.tensor([seq]))[0, -1].argmax()))
    ref = seq[len(prompt) :]
    stops = {tokenizer.eot_id, tokenizer.end_id}
    if out.finish_reason == "stop":  # ended at a stop token: the reference picked it too
        assert ref[len(out.token_ids)] in stops
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) >= 6
    assert out.text == tokenizer.decode(out.token_ids)


def test_stop_tokens_come_from_the_tokenizer(tiny_model, tokenizer):
    """A tokenizer's declared stop_ids end generation (not hard-coded ids)."""
    greedy = SamplingParams(temperature=0)
    first = generate_text(tiny_model, tokenizer, [1, 50, 60, 70], 5, greedy).token_ids[0]

    class WithStops:  # the real tokenizer, plus the attribute the chat format adds
        def __init__(self, tok, stop_ids):
            self._tok, self.stop_ids = tok, stop_ids

        def __getattr__(self, name):
            return getattr(self._tok, name)

    out = generate_text(tiny_model, WithStops(tokenizer, {first}), [1, 50, 60, 70], 5, greedy)
    assert out.token_ids == [] and out.finish_reason == "stop"


def test_same_seed_same_output_other_seed_differs(tiny_model, tokenizer):
    def run(seed):
        p = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return generate_text(tiny_model, tokenizer, [tokenizer.eot_id], 30, p).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_truncate_keeps_newest_prompt_tokens(tiny_model, tokenizer):
    ids = list(range(10, 70))  # 60 tokens, context is 64
    with pytest.raises(ContextLengthError):
        generate_text(tiny_model, tokenizer, ids, 10, SamplingParams(temperature=0))
    out = generate_text(
        tiny_model, tokenizer, ids, 10, SamplingParams(temperature=0), truncate=True
    )
    assert out.prompt_tokens == 54
    ref = generate_text(tiny_model, tokenizer, ids[-54:], 10, SamplingParams(temperature=0))
    assert out.token_ids == ref.token_ids


def test_max_tokens_default_fills_context(tiny_model, tokenizer):
    p = SamplingParams(temperature=0, logit_bias={tokenizer.eot_id: -100, tokenizer.end_id: -100})
    out = generate_text(tiny_model, tokenizer, list(range(10, 30)), None, p)
    assert len(out.token_ids) == 64 - 20 and out.finish_reason == "length"


def test_stop_strings_across_token_boundaries():
    s = StopStrings(["STOP"])
    shown = [s.feed(p) for p in ["hello S", "T", "OP and more"]]
    assert "".join(shown) == "hello " and s.stopped
    s = StopStrings(["\n\n"])
    assert s.feed("a\n") == "a" and s.feed("b") == "\nb" and s.flush() == ""


def test_sampling_params_reject_out_of_range():
    for bad, name in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2), "min_p"),
    ]:
        with pytest.raises(GlassboxError, match=name):
            SamplingParams(**bad).validate()
