from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from glassbox.checkpoint import save_json
from glassbox.errors import GlassboxError
from glassbox.tokenizer import END, EOT, MIN_VOCAB, USER, Tokenizer

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def foreign_tokenizer_json(text: str) -> HFTokenizer:
    """A byte-level BPE with a Llama/ChatML-style set of its own special tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([text], trainer=trainer)
    return hf


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
    assert text.startswith(EOT) and text.endswith("<|assistant|>\n")
    ids = tokenizer.encode_chat(msgs)
    assert tokenizer.decode(ids) == text
    whole = msgs + [{"role": "assistant", "content": "hello"}]
    assert tokenizer.encode_chat(whole, add_generation_prompt=False)[: len(ids)] == ids
    with pytest.raises(GlassboxError, match=r"messages\[0\]\.role='robot'"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_our_ids_and_stops(tokenizer):
    assert tokenizer.stop_ids == {tokenizer.eot_id, tokenizer.end_id}
    assert tokenizer.end_id == tokenizer.token_to_id(END) and not tokenizer.is_foreign
    assert len(tokenizer.special_ids) == 6 and tokenizer.pad_id in tokenizer.special_ids
    with pytest.raises(GlassboxError, match="'<nope>' is not in the tokenizer's vocabulary"):
        tokenizer.token_to_id("<nope>")


def test_encode_has_no_per_call_shared_state(tokenizer):
    """Plain and special-parsing encodes from many threads at once each get their own
    answer (flipping one shared flag per call mixed them up)."""
    text = f"a {EOT} b " * 50
    plain, special = tokenizer.encode(text), tokenizer.encode(text, allow_special=True)
    assert plain != special

    def work(i: int) -> int:
        wrong = 0
        for _ in range(60):
            if i % 2:
                wrong += tokenizer.encode(text, allow_special=True) != special
            else:  # encode_batch releases the GIL while the other threads run
                wrong += sum(ids != plain for ids in tokenizer.encode_batch([text] * 8))
        return wrong

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(work, range(4))) == 0


def test_foreign_tokenizer_loads_with_its_own_specials_and_round_trips(small_text, tmp_path):
    hf = foreign_tokenizer_json(small_text)
    (tmp_path / "src").mkdir()
    hf.save(str(tmp_path / "src" / "tokenizer.json"))
    with pytest.raises(GlassboxError, match="lacks glassbox's special tokens.*tokenizer_config"):
        Tokenizer.load(tmp_path / "src")
    save_json(  # as on the Hub: tokens as strings or {"content": ...}, template apart
        {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"},
        tmp_path / "src" / "tokenizer_config.json",
    )
    (tmp_path / "src" / "chat_template.jinja").write_text(CHATML)
    tok = Tokenizer.load(tmp_path / "src")
    ids = {t: hf.token_to_id(t) for t in ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]}
    assert tok.is_foreign and tok.chat_template == CHATML
    # Its post-processor adds no BOS, so sequences start with EOS, GPT-2 style.
    assert (tok.eot_id, tok.end_id, tok.pad_id) == (ids["</s>"], ids["<|im_end|>"], ids["</s>"])
    assert tok.stop_ids == {ids["</s>"], ids["<|im_end|>"]}
    assert tok.special_ids == set(ids.values())
    assert tok.encode("<|im_end|>", allow_special=True) == [ids["<|im_end|>"]]
    assert ids["<|im_end|>"] not in tok.encode("<|im_end|>")
    lengths = tok.token_byte_lengths()
    assert sum(lengths[i] for i in tok.encode(small_text[:500])) == len(small_text[:500].encode())

    tok.with_stop_tokens(["<pad>"]).save(tmp_path / "run" / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert again.chat_template == CHATML and again.stop_ids == tok.stop_ids | {ids["<pad>"]}
    msgs = [{"role": "user", "content": "hi"}]
    assert again.encode_chat(msgs) == tok.encode_chat(msgs)
    assert again.decode(again.encode_chat(msgs)) == "<s><|im_start|>user\nhi<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


def test_foreign_config_mistakes_are_clear(small_text, tmp_path):
    hf = foreign_tokenizer_json(small_text)
    with pytest.raises(GlassboxError, match="names no eos_token"):
        Tokenizer(hf, {"bos_token": "<s>"})
    with pytest.raises(GlassboxError, match="'</eos>' is not in the tokenizer's vocabulary"):
        Tokenizer(hf, {"eos_token": "</eos>"})
    tok = Tokenizer(hf, {"eos_token": "</s>"})  # a base model: no template, no BOS
    assert tok.eot_id == tok.end_id == tok.pad_id == hf.token_to_id("</s>")
    hf.post_processor = processors.TemplateProcessing(  # Llama-style: adds <s> itself
        single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))]
    )
    assert Tokenizer(hf, {"eos_token": "</s>"}).eot_id == hf.token_to_id("<s>")
    with pytest.raises(GlassboxError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
