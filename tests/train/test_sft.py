"""glassbox sft: assistant-only loss, packing without contamination, full and LoRA steps,
exact resume, data errors by file:line, domain mode's two bpb figures, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from glassbox.checkpoint import load_model_dir, load_tensors, save_json
from glassbox.conversation import encode_conversation
from glassbox.errors import GlassboxError
from glassbox.track import read_metrics
from glassbox.train.lora import apply_lora, lora_layers
from glassbox.train.sft import (
    SFTConfig,
    encode_examples,
    pack,
    pad_batches,
    read_chat_file,
    sft,
    sft_loss,
)

CHATS = [
    [{"role": "user", "content": "What is 47 + 85?"}, {"role": "assistant", "content": "132"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Sort ascending: 5, 2, 9"},
        {"role": "assistant", "content": "2, 5, 9"},
    ],
    [
        {"role": "user", "content": "Which is larger: 41 or 29?"},
        {"role": "assistant", "content": "41"},
        {"role": "user", "content": "And 3 or 8?"},
        {"role": "assistant", "content": "8"},
    ],
    [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "return a + b"},
    ],
]


def _write_chats(path, n_copies: int = 5):
    lines = [json.dumps({"messages": c}) for c in CHATS] * n_copies
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny(tmp_path, base_dir, name: str, **kw) -> SFTConfig:
    """A run of a few steps on a small chat file (task scoring off: no task set needed)."""
    data = _write_chats(tmp_path / "chats.jsonl")
    common = dict(base=str(base_dir), data=[str(data)], out=str(tmp_path / name), batch_size=2,
                  log_interval=1, eval_interval=3, warmup_steps=1, lr=3e-3, eval_tasks=None,
                  val_fraction=0.25, max_steps=6)  # fmt: skip
    return SFTConfig(**(common | kw))


def _loaded(base_dir):
    model, tok, _ = load_model_dir(base_dir)
    return model, tok


def test_loss_mask_covers_exactly_the_assistant_tokens(base_dir):
    model, tok = _loaded(base_dir)
    examples = encode_examples(tok, CHATS, seq_len=64, what="test")
    (batch,) = pack(examples, seq_len=64, batch_size=8)
    seen = []
    for r in range(batch.ids.shape[0]):
        segs = batch.segment_ids[r]
        for s in range(int(segs.max())):  # the last segment is the row's padding
            at = segs == s
            if not at.any():
                continue
            targets, mask = batch.targets[r][at], batch.mask[r][at]
            seen.append((batch.ids[r][at].tolist(), targets[mask].tolist()))
        assert not batch.mask[r][segs == segs.max()].any()  # padding is never learned
    assert len(seen) == len(CHATS)
    for chat in CHATS:
        ids = encode_conversation(tok, chat).ids
        learned = next(t for i, t in seen if i == ids[:-1])  # this conversation's segment
        # exactly each assistant message's content followed by the end-of-turn token
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        ends = [j for j, t in enumerate(learned) if t == tok.end_id]
        assert len(ends) == len(replies) and ends[-1] == len(learned) - 1
        starts = [0] + [e + 1 for e in ends[:-1]]
        for a, e, reply in zip(starts, ends, replies, strict=True):
            assert tok.decode(learned[a:e]).strip() == reply


def test_packed_loss_equals_unpacked_loss(base_dir):
    model, tok = _loaded(base_dir)
    examples = encode_examples(tok, CHATS * 3, seq_len=64, what="test")
    packed = pack(examples, seq_len=64, batch_size=64)
    padded = pad_batches(examples, batch_size=64, pad_id=tok.pad_id)
    assert len(packed) == len(padded) == 1
    assert packed[0].ids.shape[0] < len(examples)  # several conversations share a row
    with torch.no_grad():
        loss_packed, n_packed = sft_loss(model, packed[0])
        loss_padded, n_padded = sft_loss(model, padded[0])
        one_by_one = [sft_loss(model, b) for b in pad_batches(examples, 1)]
    total = sum(loss.item() * n for loss, n in one_by_one)
    count = sum(n for _, n in one_by_one)
    assert n_packed == n_padded == count
    torch.testing.assert_close(loss_packed.item(), loss_padded.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_packed.item(), total / count, rtol=1e-5, atol=1e-6)


def test_long_conversations_are_cut_with_a_count(base_dir, capsys):
    _, tok = _loaded(base_dir)
    long = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "apple " * 80}]
    examples = encode_examples(tok, [long, CHATS[0]], seq_len=32, what="training")
    assert [len(e.ids) for e in examples][0] == 32
    assert "1 of 2 training conversations are longer than --seq-len 32" in capsys.readouterr().err
    only_prompt = [{"role": "user", "content": "y " * 80}, {"role": "assistant", "content": "z"}]
    with pytest.raises(GlassboxError, match="No training conversation has an assistant token"):
        encode_examples(tok, [only_prompt], seq_len=16, what="training")


def test_one_full_step_changes_the_weights(base_dir, tmp_path):
    last = sft(_tiny(tmp_path, base_dir, "full", max_steps=1))
    assert last["step"] == 1 and "val_loss" in last
    before = load_tensors(base_dir / "model.safetensors")
    after = load_tensors(tmp_path / "full" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "embed.weight" in changed and "layers.0.attn.q_proj.weight" in changed


def test_one_lora_step_changes_only_the_adapters(base_dir):
    model, tok = _loaded(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batch = pack(encode_examples(tok, CHATS, 64, "test"), 64)[0]
    with torch.no_grad():
        loss_base, _ = sft_loss(model, batch)
    apply_lora(model.train(), rank=4, alpha=8.0, dropout=0.1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(model, batch)[0], loss_base, rtol=0, atol=0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft_loss(model, batch)[0].backward()
    opt.step()
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base.", ".")]), key
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_interrupted_and_resumed_equals_uninterrupted(base_dir, tmp_path, lora):
    kw = dict(lora_rank=lora, lora_dropout=0.1 if lora else 0.0)
    straight = sft(_tiny(tmp_path, base_dir, "a", **kw))
    sft(_tiny(tmp_path, base_dir, "b", checkpoint_interval=3, **kw))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")  # "killed" after step 3
    resumed = sft(_tiny(tmp_path, base_dir, "b", resume=True, **kw), explicit={"resume", "out"})
    assert resumed["step"] == straight["step"] == 6
    names = ["model.safetensors"] + (["adapter.safetensors"] if lora else [])
    for name in names:
        a, b = load_tensors(tmp_path / "a" / name), load_tensors(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    if lora:  # the merged checkpoint differs from the base, and loads as a plain model
        conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert conf["rank"] == 4 and conf["base"] == str(base_dir)
        model, _, record = load_model_dir(tmp_path / "a")
        assert record["stage"] == "sft" and record["lora"]["rank"] == 4
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]  # the base, before training
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "is not valid JSON"),
        ('{"text": "hi"}', "has no 'messages' field"),
        ('{"messages": "hi"}', "field 'messages' must be list"),
        ('{"messages": [{"content": "hi"}]}', r"messages\[0\] has no 'role' field"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content' field"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"role='bot' is not one of"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "has no assistant turn"),
    ],
)
def test_malformed_chat_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": CHATS[0]})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(GlassboxError, match=match) as err:
        read_chat_file(path)
    assert f"{path}:3" in str(err.value)


def test_domain_mode_logs_domain_and_original_bpb(base_dir, tmp_path):
    # a base whose config.json records its pretraining corpus, as `glassbox pretrain` does
    orig = tmp_path / "orig.txt"
    orig.write_text("def add(a, b):\n    return a + b\n" * 200)
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    record = json.loads((base / "config.json").read_text())
    record["train"] = {"data": [str(orig)], "text_field": "text", "val_fraction": 0.1}
    save_json(record, base / "config.json")
    domain = tmp_path / "domain.txt"
    domain.write_text("banana apple river. " * 400)
    cfg = SFTConfig(base=str(base), data=[str(domain)], mode="domain", out=str(tmp_path / "d"),
                    batch_size=2, max_steps=4, eval_interval=2, log_interval=1, lr=3e-3,
                    seq_len=32, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    last = sft(cfg)
    rows = read_metrics(tmp_path / "d" / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 2, 4]
    assert all(r["orig_val_bpb"] > 0 for r in rows if "val_bpb" in r)
    assert last["val_bpb"] < rows[0]["val_bpb"]  # it learned the domain
    # an imported-like base without a training record: no orig_val_bpb, and a note
    cfg.base, cfg.out = str(base_dir), str(tmp_path / "e")
    assert "orig_val_bpb" not in sft(cfg)


def glassbox(*args, cwd):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_end_to_end_lora_checkpoint_generates(base_dir, tmp_path):
    _write_chats(tmp_path / "chats.jsonl")
    args = ("sft", base_dir, "--data", "chats.jsonl", "--out", "lora", "--lora-rank", "4",
            "--max-steps", "3", "--batch-size", "2", "--eval-interval", "3", "--eval-tasks",
            "none", "--lr", "3e-3")  # fmt: skip
    proc = glassbox(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 3" in proc.stdout and "wrote lora/" in proc.stdout
    for name in ("model.safetensors", "adapter.safetensors", "adapter_config.json", "loss.png"):
        assert (tmp_path / "lora" / name).is_file(), name
    gen = glassbox("generate", "lora", "--prompt", "What", "--max-tokens", "5", "--temperature",
                   "0", cwd=tmp_path)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("What")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    bad = glassbox("sft", base_dir, "--data", "bad.jsonl", "--out", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "bad.jsonl:1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_heldout_task_accuracy_is_logged_and_rises(base_dir, tmp_path):
    hello = [{"role": "user", "content": "Say apple"}, {"role": "assistant", "content": "apple"}]
    data = tmp_path / "hello.jsonl"
    data.write_text((json.dumps({"messages": hello}) + "\n") * 8)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "Say apple", "answer": "apple", "family": "echo"}))
    cfg = SFTConfig(base=str(base_dir), data=[str(data)], out=str(tmp_path / "t"), batch_size=4,
                    max_steps=30, eval_interval=30, lr=1e-2, warmup_steps=2,
                    eval_tasks=str(tasks), packing=False)  # fmt: skip
    last = sft(cfg)
    first = read_metrics(tmp_path / "t" / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["acc_echo"] == first["accuracy"] == 0.0
    assert last["acc_echo"] == last["accuracy"] == 1.0
