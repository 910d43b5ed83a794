import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from glassbox import checkpoint as ckpt
from glassbox.config import ModelConfig
from glassbox.conversation import encode_conversation, encode_prompt
from glassbox.errors import GlassboxError
from glassbox.interop.hf import export_hf, import_hf
from glassbox.model import Transformer
from glassbox.tokenizer import END, Tokenizer

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What does the with statement do?"},
    {"role": "assistant", "content": "It wraps a block in a context manager."},
    {"role": "user", "content": "And the  try  statement?"},
    {"role": "assistant", "content": "It handles exceptions."},
    {"role": "user", "content": "Thanks!"},
]

# A SmolLM-style foreign chat format: ChatML markers, the model's own <s>/</s>.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_ids(hf_tok, messages, add_generation_prompt):
    return hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


def masked_runs(tok, ids, mask) -> list[str]:
    """The text of each run of consecutive masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def save_ours(tmp_path, tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up would show
        for layer in model.layers:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
    ckpt.save_model_dir(tmp_path / "ours", model, tokenizer, "test")
    return model


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_kv_head=2, tie_embeddings=False), dict(n_kv_head=1, rope_theta=500000.0)],
)
def test_export_matches_transformers_llama_and_imports_back(tmp_path, tokenizer, overrides):
    model = save_ours(tmp_path, tokenizer, **overrides)
    export_hf(tmp_path / "ours", tmp_path / "hf")

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tok, record = ckpt.load_model_dir(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, rtol=0, atol=0)
    assert record["stage"] == "import"
    assert not back_tok.is_foreign  # our own export comes back as ours
    assert back_tok.encode_chat(CHAT) == tokenizer.encode_chat(CHAT)


def test_exported_tokenizer_adds_bos_like_ours_and_chat_ids_match(tmp_path, tokenizer):
    save_ours(tmp_path, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")

    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)  # ünïcode"
    assert hf_tok(text)["input_ids"] == [tokenizer.eot_id, *tokenizer.encode(text)]
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text

    # apply_chat_template: the template writes the BOS once; ids equal our renderer's.
    for n in range(1, len(CHAT) + 1):
        msgs = CHAT[:n]
        prompt = hf_ids(hf_tok, msgs, add_generation_prompt=True)
        assert prompt == encode_prompt(tokenizer, msgs)
        assert prompt.count(tokenizer.eot_id) == 1
        assert hf_ids(hf_tok, msgs, False) == encode_conversation(tokenizer, msgs).ids
    assert hf_tok.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=False
    )


def bigram_chat_model(tokenizer, prompt: list[int], reply: int) -> Transformer:
    """A model whose greedy continuation of ``prompt`` is ``reply``, <|end|>, then more.

    Attention and MLP outputs are zeroed, so the residual stream is the current token's
    embedding and the logits depend on that token alone: a bigram table we write by hand.
    """
    cfg = ModelConfig.from_name("test", vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    model = Transformer(cfg).eval()
    end, after_end = tokenizer.end_id, tokenizer.encode("x")[0]
    chain = {prompt[-1]: reply, reply: end, end: after_end}  # token -> next token
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 1.0  # every other token: direction 0
        model.lm_head.weight.zero_()
        model.lm_head.weight[after_end, 0] = 1.0
        for k, (tok, nxt) in enumerate(chain.items(), start=1):
            model.embed.weight[tok] = 0.0
            model.embed.weight[tok, k] = 1.0
            model.lm_head.weight[nxt, k] = 1.0
    return model


def test_transformers_generate_stops_at_end_of_turn(tmp_path, tokenizer):
    prompt = encode_prompt(tokenizer, CHAT[:2])
    reply = tokenizer.encode("hi")[0]
    model = bigram_chat_model(tokenizer, prompt, reply)
    ckpt.save_model_dir(tmp_path / "chat", model, tokenizer, "sft")
    export_hf(tmp_path / "chat", tmp_path / "hf")

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([prompt])
    # Without an end-of-turn stop the bigram chain runs on past <|end|>:
    free = hf.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eot_id)
    after_end = tokenizer.encode("x")[0]
    assert free[0, len(prompt) :].tolist()[:3] == [reply, tokenizer.end_id, after_end]
    out = hf.generate(x, max_new_tokens=6, do_sample=False)  # generation_config.json
    assert out[0, len(prompt) :].tolist() == [reply, tokenizer.end_id]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.decode(out[0, len(prompt) :]) == tokenizer.decode([reply]) + END


# ---------------------------------------------------------------------------------------
# A foreign Llama checkpoint (no glassbox special tokens)
# ---------------------------------------------------------------------------------------


def foreign_tokenizer(text: str):
    """A byte-level BPE with its own specials and a ChatML template, as transformers saves."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([text], trainer=trainer)
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<s>", eos_token="</s>", chat_template=CHATML
    )


# Two more template styles found on the Hub: end-of-turn = eos (TinyLlama/Zephyr), and
# Llama 3's header tokens with trimmed content.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, end", [(CHATML, "<|im_end|>"), (ZEPHYR, "</s>"), (LLAMA3, "<|eot_id|>")]
)
def test_foreign_templates_render_like_transformers(tmp_path, small_text, template, end):
    hf_tok = foreign_tokenizer(small_text)
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    hf_tok.add_special_tokens({"additional_special_tokens": extra})
    hf_tok.chat_template = template
    hf_tok.save_pretrained(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.end_id == tok.token_to_id(end) and tok.end_id in tok.stop_ids
    for n in range(1, len(CHAT) + 1):
        assert encode_prompt(tok, CHAT[:n]) == hf_ids(hf_tok, CHAT[:n], True)
        assert encode_conversation(tok, CHAT[:n]).ids == hf_ids(hf_tok, CHAT[:n], False)
    ids, mask = encode_conversation(tok, CHAT)
    replies = [m["content"] + end for m in CHAT if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == replies


@pytest.fixture
def foreign_dir(tmp_path, small_text):
    hf_tok = foreign_tokenizer(small_text)
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(
        vocab_size=len(hf_tok) + 12,  # padded embedding rows, as real checkpoints have
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
    )
    hf = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "smol")
    hf_tok.save_pretrained(tmp_path / "smol")
    return tmp_path / "smol"


def test_foreign_llama_imports_with_its_own_tokenizer_and_template(tmp_path, foreign_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(foreign_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(foreign_dir)
    import_hf(foreign_dir, tmp_path / "run")
    model, tok, _ = ckpt.load_model_dir(tmp_path / "run")

    x = torch.randint(0, hf.config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)

    assert tok.is_foreign and tok.chat_template == CHATML
    assert tok.eot_id == hf_tok.bos_token_id  # prompts start with the model's BOS
    assert tok.end_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.stop_ids == {hf_tok.eos_token_id, tok.end_id}
    for n in range(1, len(CHAT) + 1):
        assert encode_prompt(tok, CHAT[:n]) == hf_ids(hf_tok, CHAT[:n], True)
        assert encode_conversation(tok, CHAT[:n]).ids == hf_ids(hf_tok, CHAT[:n], False)
    ids, mask = encode_conversation(tok, CHAT)
    replies = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == replies

    # The checkpoint round-trips: export it again and transformers agrees on ids and logits.
    export_hf(tmp_path / "run", tmp_path / "hf2")
    hf_tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert hf_ids(hf_tok2, CHAT, True) == hf_ids(hf_tok, CHAT, True)
    assert hf_tok2("plain text")["input_ids"] == hf_tok("plain text")["input_ids"]
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    assert set(hf2.generation_config.eos_token_id) == tok.stop_ids
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_foreign_import_keeps_extra_eos_ids_from_generation_config(tmp_path, foreign_dir):
    gen = ckpt.load_json(foreign_dir / "generation_config.json")
    extra = transformers.AutoTokenizer.from_pretrained(foreign_dir).convert_tokens_to_ids(
        "<|im_start|>"
    )
    gen["eos_token_id"] = [gen["eos_token_id"], extra]
    ckpt.save_json(gen, foreign_dir / "generation_config.json")
    import_hf(foreign_dir, tmp_path / "run")
    tok = Tokenizer.load(tmp_path / "run")
    assert extra in tok.stop_ids


def test_out_guard_for_export_and_import(tmp_path, tokenizer):
    save_ours(tmp_path, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    with pytest.raises(GlassboxError, match="not empty; pass --force"):
        export_hf(tmp_path / "ours", tmp_path / "hf")
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    export_hf(tmp_path / "ours", tmp_path / "hf", force=True)
    assert not (tmp_path / "hf" / "model-00002-of-00002.safetensors").exists()
    with pytest.raises(GlassboxError, match="is the source directory.*choose another --out"):
        export_hf(tmp_path / "ours", tmp_path / "ours", force=True)
    with pytest.raises(GlassboxError, match="is the source directory.*choose another --out"):
        import_hf(tmp_path / "hf", tmp_path / "hf", force=True)

    import_hf(tmp_path / "hf", tmp_path / "run")
    with pytest.raises(GlassboxError, match="not empty; pass --force"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    snapshot = tmp_path / "run" / "checkpoints" / "step_00000100"
    snapshot.mkdir(parents=True)
    import_hf(tmp_path / "hf", tmp_path / "run", force=True)
    assert ckpt.list_snapshots(tmp_path / "run") == []  # --resume cannot revert the import


def test_import_rejects_other_architectures(tmp_path):
    with pytest.raises(GlassboxError, match="nope is not a directory"):
        import_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "src").mkdir()
    ckpt.save_json({"model_type": "gpt2"}, tmp_path / "src" / "config.json")
    with pytest.raises(GlassboxError, match="model_type='gpt2'"):
        import_hf(tmp_path / "src", tmp_path / "out")


# A full tool round trip: definitions, parallel calls (arguments as a JSON string and as
# an object), two grouped results, the answer.
TOOLS = [
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers (ünïcode kept).",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time."}},
]  # fmt: skip
TOOL_CHAT = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is 2 + 3, and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "add", "arguments": '{"a":2,"b":3}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "assistant", "content": "5, at 12:00."},
]  # fmt: skip


def test_exported_template_renders_tool_round_trips_like_ours(tmp_path, tokenizer):
    save_ours(tmp_path, tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for start in (0, 1):  # with and without a system message of the user's
        chat = TOOL_CHAT[start:]
        for n in range(1, len(chat) + 1):
            msgs = chat[:n]
            ours = encode_prompt(tokenizer, msgs, TOOLS)
            theirs = hf_tok.apply_chat_template(
                msgs, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            assert theirs == ours, n
            full = hf_tok.apply_chat_template(msgs, tools=TOOLS, tokenize=True, return_dict=False)
            assert full == encode_conversation(tokenizer, msgs, TOOLS).ids
    text = hf_tok.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert '<tool_call>\n{"name":"add","arguments":{"a":2,"b":3}}\n</tool_call>\n' in text
    assert "<tool_response>\n5\n</tool_response>\n<tool_response>\n12:00" in text
