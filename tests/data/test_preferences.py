"""Preference pairs: both JSONL forms, tokens through the chat renderer, fitting, batches,
errors naming file:line and field, and builtin:preferences."""

from __future__ import annotations

import json

import pytest
import torch

from glassbox.conversation import encode_conversation, encode_prompt
from glassbox.data.preferences import (
    BUILTIN,
    MIN_PROMPT_TOKENS,
    PairTokens,
    PreferenceDataConfig,
    collate,
    encode_pair,
    fit_pair,
    load_pairs,
    load_preference_sets,
    split_pairs,
    tokenize_pairs,
)
from glassbox.errors import GlassboxError
from glassbox.tokenizer import Tokenizer

TEXT = "What is 47 + 85? 132. Which is larger: 41 or 29? 41. Sort: 5, 2, 9 -> 2, 5, 9.\n" * 30


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


def write(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def chat(q, good, bad, **extra):
    return {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    } | extra


def test_conversational_pairs_tokenize_through_the_chat_renderer(tok, tmp_path):
    (pair,) = load_pairs(write(tmp_path / "p.jsonl", chat("What is 4 + 5?", "9", "10")))
    ids = encode_pair(tok, pair)
    prompt = [{"role": "user", "content": "What is 4 + 5?"}]
    assert ids.prompt == encode_prompt(tok, prompt)
    for answer, completion in (("9", ids.chosen), ("10", ids.rejected)):
        full = encode_conversation(tok, [*prompt, {"role": "assistant", "content": answer}])
        assert full.ids[: len(ids.prompt) + len(completion)] == ids.prompt + completion
        learned = [t for t, m in zip(full.ids, full.loss_mask, strict=True) if m]
        assert completion == learned and completion[-1] == tok.end_id
    assert ids.margin == 0.0


def test_standard_pairs_continue_plain_text(tok, tmp_path):
    row = {"prompt": "What is 4 + 5?", "chosen": " 9", "rejected": " 10", "margin": 2}
    (pair,) = load_pairs(write(tmp_path / "p.jsonl", row))
    ids = encode_pair(tok, pair)
    assert ids.prompt == [tok.eot_id, *tok.encode("What is 4 + 5?")]
    assert ids.chosen == [*tok.encode(" 9"), tok.eot_id]
    assert ids.rejected == [*tok.encode(" 10"), tok.eot_id]
    assert ids.margin == 2.0


@pytest.mark.parametrize(
    "row,message",
    [
        ("{not json", r"p.jsonl:2 is not valid JSON"),
        ('["a list"]', r"p.jsonl:2 must be a JSON object"),
        ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2 has no 'rejected' field"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"p.jsonl:2: field 'prompt' must be"),
        ({"prompt": "q", "chosen": [], "rejected": "b"}, r"p.jsonl:2: field 'chosen' must be str"),
        (chat("q", "a", "b", margin="big"), r"p.jsonl:2: field 'margin' must be int or float"),
        (chat("q", "a", "b") | {"chosen": [{"role": "user", "content": "a"}]},
         r"p.jsonl:2: field 'chosen' must be one assistant message"),
        (chat("q", "a", "b") | {"prompt": [{"role": "robot", "content": "q"}]},
         r"p.jsonl:2: field 'prompt': messages\[0\].role='robot'"),
    ],
)  # fmt: skip
def test_malformed_lines_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "p.jsonl", chat("fine", "a", "b"), row)
    with pytest.raises(GlassboxError, match=message):
        load_pairs(path)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(GlassboxError, match="nope.jsonl does not exist"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GlassboxError, match="holds no preference pairs"):
        load_pairs(str(tmp_path / "empty.jsonl"))
    with pytest.raises(GlassboxError, match="builtin:nothing"):
        load_pairs("builtin:nothing")


def test_long_pairs_lose_prompt_tokens_from_the_left_or_are_dropped():
    pair = PairTokens(prompt=list(range(10)), chosen=[20, 21], rejected=[30, 31, 32])
    assert fit_pair(pair, 20) is pair
    cut = fit_pair(pair, 9)  # 9 - 3 = 6 prompt tokens kept, the last six
    assert cut.prompt == [4, 5, 6, 7, 8, 9] and cut.chosen == [20, 21]
    assert fit_pair(pair, 3 + MIN_PROMPT_TOKENS) is not None
    assert fit_pair(pair, 3 + MIN_PROMPT_TOKENS - 1) is None


def test_tokenize_counts_dropped_pairs(tok, tmp_path):
    long_answer = "41 or 29 " * 20
    path = write(tmp_path / "p.jsonl", chat("q", "a", "b"), chat("q", long_answer, "b"))
    kept, dropped = tokenize_pairs(tok, load_pairs(path), max_len=24)
    assert len(kept) == 1 and dropped == 1


def test_collate_puts_chosen_rows_first_with_masks():
    pairs = [PairTokens([1, 2], [3], [4, 5], 0.5), PairTokens([6], [7, 8, 9], [10], 0.0)]
    b = collate(pairs, pad_id=0)
    assert b.ids.tolist() == [[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]
    assert b.attention_mask.sum(1).tolist() == [3, 4, 4, 2]
    assert b.completion_mask.int().tolist() == [
        [0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]  # fmt: skip
    torch.testing.assert_close(b.margin, torch.tensor([0.5, 0.0]))
    assert b.tokens == 13


def test_split_is_seeded_and_disjoint():
    pairs = [{"i": i} for i in range(20)]
    train, val = split_pairs(pairs, 0.1, seed=1)
    assert len(val) == 2 and len(train) == 18
    assert split_pairs(pairs, 0.1, seed=1) == (train, val)
    assert {p["i"] for p in train} | {p["i"] for p in val} == set(range(20))
    with pytest.raises(GlassboxError, match="cannot be split"):
        split_pairs(pairs[:1], 0.1, seed=1)


def test_builtin_pairs_with_noise(tok):
    clean = load_pairs(BUILTIN, "heldout")
    noisy = load_pairs(BUILTIN, "heldout", noise=0.25)
    assert len(clean) == len(noisy) > 100
    assert not any(p["noisy"] for p in clean)
    share = sum(p["noisy"] for p in noisy) / len(noisy)
    assert share == pytest.approx(0.25, abs=0.01)
    flipped = next(i for i, p in enumerate(noisy) if p["noisy"])
    assert noisy[flipped]["chosen"] == clean[flipped]["rejected"]
    ids = encode_pair(tok, clean[0])  # built-in pairs are in the conversational form
    assert ids.group == clean[0]["criterion"] and ids.group in ("correctness", "format",
                                                                 "concision")  # fmt: skip
    assert fit_pair(ids, len(ids.prompt) + 40).group == ids.group


def test_sets_hold_out_a_file_share_and_check_settings(tok, tmp_path):
    path = write(tmp_path / "p.jsonl", *[chat(f"q{i}", "a", "b") for i in range(10)])
    sets = load_preference_sets(PreferenceDataConfig(data=path, val_fraction=0.2), tok, 64, 0)
    assert (len(sets.train), len(sets.val), sets.dropped) == (8, 2, 0)
    with pytest.raises(GlassboxError, match="--max-len=128 exceeds the model's context of 64"):
        load_preference_sets(PreferenceDataConfig(data=path, max_len=128), tok, 64, 0)
    with pytest.raises(GlassboxError, match="--noise=0.1 applies to builtin:preferences only"):
        PreferenceDataConfig(data=path, noise=0.1).validate_data()
