import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassbox.errors import GlassboxError
from glassbox.tokenizer import EOT, MIN_VOCAB, USER, Tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_token_bytes_sum_to_utf8_length(tokenizer, text):
    lengths = tokenizer.token_byte_lengths()
    ids = tokenizer.encode(text)
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8", "surrogatepass"))


def test_vocab_sizes_from_bytes_only_to_large(small_text):
    bytes_only = Tokenizer.train([small_text], vocab_size=MIN_VOCAB, show_progress=False)
    assert bytes_only.vocab_size == MIN_VOCAB
    assert len(bytes_only.encode("hello")) == 5  # one token per byte
    big = Tokenizer.train([small_text], vocab_size=2000, show_progress=False)
    assert MIN_VOCAB < big.vocab_size <= 2000
    assert len(big.encode(small_text)) < len(small_text.encode()) / 2  # merges compress


def test_vocab_out_of_range_is_a_clear_error(small_text):
    with pytest.raises(GlassboxError, match="vocab_size=100 is out of range"):
        Tokenizer.train([small_text], vocab_size=100)


def test_special_token_text_cannot_forge_markers(tokenizer):
    ids = tokenizer.encode(f"{USER} hi {EOT}")
    assert not set(ids) & tokenizer.special_ids
    assert tokenizer.encode(EOT, allow_special=True) == [tokenizer.eot_id]


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.encode("def f(x): return x") == tokenizer.encode("def f(x): return x")
    with pytest.raises(GlassboxError, match="Missing tokenizer file"):
        Tokenizer.load(tmp_path / "nope.json")


def test_chat_template_ids_match_text(tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(msgs)
    assert text.endswith("<|assistant|>\n")
    ids = tokenizer.encode_chat(msgs)
    assert tokenizer.decode(ids) == EOT + text
    with pytest.raises(GlassboxError, match="role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_stream_decoder_never_splits_characters(tokenizer):
    text = "naïve 日本語 🎉 done"
    dec = tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
