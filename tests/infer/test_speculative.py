"""Speculative decoding: greedy gives exactly the target's tokens (draft model and
prompt lookup), and sampling follows the target's distribution (the acceptance rule
checked analytically, then end to end with a chi-square test over seeded draws on a
tiny vocabulary)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.infer.speculative import (
    SpeculativeDecoder,
    check_same_tokenizer,
    lookup_proposals,
    speculative_generate_text,
)
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)


def random_model(vocab: int, seed: int, std: float = 0.2) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("test", vocab_size=vocab, init_std=std)).eval()


@pytest.fixture(scope="module")
def draft(tok) -> Transformer:
    """A different random model with the target's vocabulary."""
    return random_model(tok.vocab_size, 1)


def prompts(tok) -> list[list[int]]:
    texts = ["hello world", "a small test of the", "0123456789. 0123", "faults stay"]
    return [[tok.eot_id, *tok.encode(t)] for t in texts]


def engine_greedy(model, tok, prompt, n) -> list[int]:
    return Engine(model, tok, max_seqs=1).run([GenerationRequest(prompt, GREEDY, n)])[0][0]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_a_draft_gives_the_target_tokens(model, tok, draft, k):
    dec = SpeculativeDecoder(model, tok, draft=draft, k=k)
    for p in prompts(tok):
        out = list(dec.generate(p, GREEDY, 30))
        assert out == engine_greedy(model, tok, p, 30)
        assert dec.stats.emitted == 30 and dec.stats.rounds < 30 + 1


def test_greedy_prompt_lookup_gives_the_target_tokens(model, tok):
    dec = SpeculativeDecoder(model, tok, prompt_lookup=3, k=4)
    accepted = 0
    for p in prompts(tok):
        p = p + engine_greedy(model, tok, p, 12) + p  # a repeat, so lookup has matches
        out = list(dec.generate(p, GREEDY, 20))
        assert out == engine_greedy(model, tok, p, 20)
        accepted += dec.stats.accepted
    assert accepted > 0  # some proposals were right (and the rest rejected correctly)


def test_draft_equal_to_target_accepts_everything(model, tok):
    dec = SpeculativeDecoder(model, tok, draft=model, k=4)
    out = list(dec.generate(prompts(tok)[1], GREEDY, 21))
    assert out == engine_greedy(model, tok, prompts(tok)[1], 21)
    assert dec.stats.acceptance_rate == 1.0 and dec.stats.rounds == 5  # 4 + 1 per round


def test_acceptance_rule_is_exact_analytically():
    """For one position: P(first token = x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x)
    with r = norm(max(0, p - q)), which must equal p(x) for any p and q."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.rand(10, generator=g) ** 3
        q = torch.rand(10, generator=g) ** 3
        p[torch.rand(10, generator=g) < 0.3] = 0.0  # disjoint supports in places
        p, q = p / p.sum(), q / q.sum()
        accept = q * torch.minimum(torch.ones(10), p / q)
        residual = (p - q).clamp_min(0)
        out = accept + (1 - accept.sum()) * residual / residual.sum()
        torch.testing.assert_close(out, p)


def target_joint(model, prefix: list[int], params: SamplingParams) -> torch.Tensor:
    """The target's own distribution of the next two tokens, (V, V), from full forwards."""
    from glassbox.infer.sampling import filter_logits

    def dist(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1:]
        return filter_logits(logits, params.temperature, params.top_k).softmax(-1)[0]

    p1 = dist(prefix)
    return torch.stack([p1[a] * dist([*prefix, a]) for a in range(len(p1))])


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor, n: int) -> float:
    """Cells expected below 5 are pooled, so the test's approximation holds."""
    exp = expected_probs.flatten().double() * n
    obs = counts.flatten().double()
    big = exp >= 5
    f_obs = torch.cat([obs[big], obs[~big].sum().view(1)])
    f_exp = torch.cat([exp[big], exp[~big].sum().view(1)])
    f_exp = f_exp * (f_obs.sum() / f_exp.sum())  # float rounding of the probabilities
    assert int(obs[exp == 0].sum()) == 0  # never a token the target cannot sample
    return float(chisquare(f_obs.numpy(), f_exp.numpy()).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_sampling_matches_the_target_distribution(proposer):
    """1200 seeded runs of 3 tokens (rounds of up to 2 proposals): the joint frequency
    of the first two tokens against the target's exact distribution, p > 0.001. The
    seeds are fixed, so the test cannot flake; a wrong rule (say, accepting every
    proposal) fails it by a wide margin."""
    V = 8
    target = random_model(V, 10, std=0.5)
    draft = random_model(V, 11, std=0.5) if proposer == "draft" else None
    prefix = [1, 2, 3, 1, 2]  # lookup proposes 3, then 1, 2 (the n-gram repeats)
    params = SamplingParams(temperature=1.0, top_k=6)
    dec = SpeculativeDecoder(target, None, draft=draft, prompt_lookup=0 if draft else 2, k=2)
    n = 1200
    counts = torch.zeros(V, V)
    accepted = 0
    for seed in range(n):
        out = list(dec.generate(prefix, SamplingParams(temperature=1.0, top_k=6, seed=seed), 3))
        counts[out[0], out[1]] += 1
        accepted += dec.stats.accepted
    assert accepted > n // 10  # proposals are accepted often enough to matter
    assert chi_square_pvalue(counts, target_joint(target, prefix, params), n) > 0.001


def test_lookup_proposals():
    assert lookup_proposals([5, 6, 7, 8, 5, 6], 2, 3) == [7, 8, 5]
    assert lookup_proposals([4, 4, 4, 4, 4], 2, 3) == [4, 4, 4]  # not the 1-token tail
    assert lookup_proposals([5, 6, 7, 9, 6], 2, 2) == [7, 9]  # falls back to 1-grams
    assert lookup_proposals([1, 2, 3], 3, 4) == []


def test_penalties_and_bias_keep_greedy_exact(model, tok, draft):
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias={5: 3.0})
    p = prompts(tok)[2]
    out = list(SpeculativeDecoder(model, tok, draft=draft, k=3).generate(p, params, 25))
    ref = Engine(model, tok, max_seqs=1).run([GenerationRequest(p, params, 25)])[0][0]
    assert out == ref


def test_text_wrapper_stops_like_generate(model, tok, draft):
    from glassbox.infer.generate import generate_text

    p = prompts(tok)[0]
    ref = generate_text(model, tok, p, 20, GREEDY)
    got = speculative_generate_text(SpeculativeDecoder(model, tok, draft=draft), p, 20, GREEDY)
    assert (got.text, got.token_ids, got.finish_reason) == (
        ref.text,
        ref.token_ids,
        ref.finish_reason,
    )
    stop = ref.text[5:8]
    ref = generate_text(model, tok, p, 20, GREEDY, stop=[stop])
    dec = SpeculativeDecoder(model, tok, prompt_lookup=2)
    got = speculative_generate_text(dec, p, 20, GREEDY, stop=[stop])
    assert got.text == ref.text and got.finish_reason == "stop"


def test_clear_errors(model, tok, draft):
    with pytest.raises(GlassboxError, match="exactly one proposer"):
        SpeculativeDecoder(model, tok)
    with pytest.raises(GlassboxError, match="exactly one proposer"):
        SpeculativeDecoder(model, tok, draft=draft, prompt_lookup=2)
    with pytest.raises(GlassboxError, match="num_speculative=0"):
        SpeculativeDecoder(model, tok, draft=draft, k=0)
    with pytest.raises(GlassboxError, match="context"):
        list(SpeculativeDecoder(model, tok, draft=draft).generate([1] * 60, GREEDY, 10))
    other = Tokenizer.train(["something else entirely " * 50], vocab_size=280, show_progress=False)
    with pytest.raises(GlassboxError, match="runs/draft.*different tokenizer|different tokenizer"):
        check_same_tokenizer(tok, other, "runs/target", "runs/draft")
    check_same_tokenizer(tok, tok)  # no error


@pytest.mark.slow
def test_cli_generate_with_a_draft_and_with_prompt_lookup(model, tok, draft, tmp_path):
    """`glassbox generate --draft` / `--prompt-lookup`: the plain command's greedy text,
    and the acceptance rate on stderr; a draft with another tokenizer is refused."""
    import subprocess
    import sys

    from glassbox.checkpoint import save_model_dir

    save_model_dir(tmp_path / "target", model, tok, "pretrain")
    save_model_dir(tmp_path / "draft", draft, tok, "pretrain")
    other = Tokenizer.train(["something else entirely " * 50], vocab_size=280, show_progress=False)
    save_model_dir(tmp_path / "alien", random_model(other.vocab_size, 2), other, "pretrain")

    def glassbox(*args):
        cmd = [sys.executable, "-m", "glassbox.cli", "generate", str(tmp_path / "target"),
               "--prompt", "hello world", "--max-tokens", "16", "--temperature", "0",
               "--dtype", "fp32", "--device", "cpu", *args]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    plain = glassbox()
    assert plain.returncode == 0, plain.stderr[-2000:]
    for args in (["--draft", str(tmp_path / "draft"), "--num-speculative", "3"],
                 ["--prompt-lookup", "2"]):  # fmt: skip
        spec = glassbox(*args)
        assert spec.returncode == 0, spec.stderr[-2000:]
        assert spec.stdout == plain.stdout
        assert "speculative: acceptance" in spec.stderr
    bad = glassbox("--draft", str(tmp_path / "alien"))
    assert bad.returncode != 0 and "different tokenizer" in bad.stderr
    assert "Traceback" not in bad.stderr
