"""Grammar-constrained decoding: every finished output matches its constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine, GenerationRequest
from glassbox.infer.sampling import SamplingParams
from glassbox.infer.structured import Constraint, GrammarCompiler, unpack_bitmask
from glassbox.model import Transformer
from glassbox.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "label": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog"]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
        "nested": {
            "type": "object",
            "properties": {"flag": {"type": "boolean"}},
            "required": ["flag"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "kind", "nested"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup():
    texts = ['{"id": 12, "label": "abc", "kind": "cat", "scores": [1.5, -2]}\n' * 30]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    # vocab padded past the tokenizer's, as the gpt2 preset does: masks must line up
    model = Transformer(ModelConfig.from_name("test", vocab_size=320, context_length=128)).eval()
    eng = Engine(model, tok, max_seqs=8)
    compiler = GrammarCompiler(tok, 320, [tok.end_id, tok.eot_id])
    return tok, eng, compiler


def run(setup, constraint: Constraint, seeds=range(6), max_tokens=100) -> list[tuple[str, str]]:
    tok, eng, compiler = setup
    grammar = compiler.compile(constraint)
    stop = frozenset({tok.end_id, tok.eot_id})
    reqs = [
        GenerationRequest(
            [tok.eot_id],
            SamplingParams(temperature=1.0, seed=s),
            max_tokens,
            stop_token_ids=stop,
            grammar=grammar,
        )  # fmt: skip
        for s in seeds
    ]
    groups = [eng.add(r) for r in reqs]  # all constrained sequences decode as one batch
    while eng.has_work:
        eng.step()
    return [(tok.decode(g[0].output), g[0].finish_reason) for g in groups]


def test_json_schema_outputs_parse_and_validate(setup):
    outs = run(setup, Constraint("json_schema", SCHEMA))
    assert all(reason == "stop" for _, reason in outs), outs
    for text, _ in outs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({t for t, _ in outs}) > 1  # really sampled, not one canned answer


def test_json_object(setup):
    # An object of any size may run out of tokens; these seeded draws are known to close
    # it (same tokens alone or batched), so a broken grammar or stop rule fails here.
    outs = run(setup, Constraint("json_object"), seeds=(3, 4, 10, 16, 22), max_tokens=120)
    assert all(reason == "stop" for _, reason in outs), outs
    assert all(isinstance(json.loads(text), dict) for text, _ in outs)
    assert len({t for t, _ in outs}) > 1


def test_regex_and_choice(setup):
    pattern = r"(yes|no)-[0-9]{2,4}"
    for text, reason in run(setup, Constraint("regex", pattern)):
        assert reason == "stop" and re.fullmatch(pattern, text)
    choices = ["alpha", "beta gamma", 'quote " and \\ slash']
    outs = run(setup, Constraint("choice", choices), seeds=range(10))
    assert all(reason == "stop" and text in choices for text, reason in outs), outs
    assert len({t for t, _ in outs}) > 1


def test_mask_allows_only_grammar_tokens(setup):
    tok, _, compiler = setup
    m = compiler.compile(Constraint("regex", "[0-9]+")).matcher()
    allowed = m.allowed().nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).isdigit() for t in allowed)
    assert m.allowed().shape == (320,) and not m.allowed()[300:].any()  # padding never allowed
    bits = torch.tensor([[0b101, -1]], dtype=torch.int32)
    mask = unpack_bitmask(bits, 40)
    assert mask[0, :3].tolist() == [True, False, True] and mask[0, 32:].all()


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", {"type": "nonsense"}),
        Constraint("json_schema", {"$ref": "#/missing"}),
        Constraint("regex", "(unclosed"),
        Constraint("choice", []),
    ],
)
def test_bad_constraints_are_user_errors(setup, constraint):
    with pytest.raises(GlassboxError):
        setup[2].compile(constraint)


def test_grammar_compiles_once_and_matchers_are_independent_copies(setup):
    tok, _, compiler = setup
    c = Constraint("regex", "(ab|cd)[0-9]")
    grammar = compiler.compile(c)
    assert compiler.compile(Constraint("regex", "(ab|cd)[0-9]")) is grammar  # cached
    a, b = grammar.matcher(), grammar.matcher()
    start = a.allowed()
    a_tokens = tok.encode("ab")
    for t in a_tokens:
        assert a.accept(t)
    assert not torch.equal(a.allowed(), start)  # a moved on ...
    assert torch.equal(b.allowed(), start)  # ... b is still at the start
    assert torch.equal(grammar.matcher().allowed(), start)  # and so is a new one


def test_hostile_grammars_fail_fast_as_user_errors(setup):
    import time

    compiler = setup[2]
    deep: dict = {"type": "string"}
    for _ in range(2000):
        deep = {"type": "array", "items": deep}
    t = time.perf_counter()
    with pytest.raises(GlassboxError):
        compiler.compile(Constraint("json_schema", deep))  # RecursionError inside -> 400
    # 15 bytes that unroll to a million states; with llguidance's default fuel this
    # takes seconds to compile, under our limits the lexer is built lazily.
    m = compiler.compile(Constraint("regex", "(a{1000}){1000}")).matcher()
    assert m.allowed().any()
    assert time.perf_counter() - t < 1.5
