"""`glassbox chat`: history, the context meter, and dropping the oldest turns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from glassbox.checkpoint import load_model_dir
from glassbox.cli import app
from glassbox.errors import GlassboxError
from glassbox.infer.engine import Engine
from glassbox.infer.sampling import SamplingParams
from glassbox.serve.chat import ChatSession, meter


@pytest.fixture
def session(tiny_ckpt) -> ChatSession:
    model, tok, _ = load_model_dir(tiny_ckpt)
    return ChatSession(
        Engine(model, tok, max_seqs=1), system="be brief", max_tokens=12,
        params=SamplingParams(temperature=0.0),
    )  # fmt: skip


def test_history_grows_and_meter_counts_tokens(session):
    streamed = []
    r1 = session.send("hello world", on_text=streamed.append)
    assert "".join(streamed) == r1.text
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert r1.used == len(session.tok.encode_chat(session.messages, add_generation_prompt=False))
    r2 = session.send("and again")
    assert r2.used > r1.used and r2.dropped == 0
    assert meter(64, 128) == "[##########----------] 64/128 tokens (50%)"


def test_full_context_drops_oldest_turns_keeps_system(session):
    dropped = 0
    for i in range(12):  # 128-token context, 12-token replies: it must fill up
        r = session.send(f"message number {i} with some words")
        dropped += r.dropped
        assert r.used <= r.context
    assert dropped > 0
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    assert session.messages[1]["role"] == "user"
    assert session.messages[-2]["content"] == "message number 11 with some words"


def test_compress_summarizes_old_turns_instead_of_dropping_them(tiny_ckpt):
    model, tok, _ = load_model_dir(tiny_ckpt)
    session = ChatSession(
        Engine(model, tok, max_seqs=1), system="be brief", max_tokens=12,
        params=SamplingParams(temperature=0.0), compress=True,
    )  # fmt: skip
    compressed = 0
    for i in range(12):
        r = session.send(f"message number {i} with some words")
        assert r.dropped == 0
        compressed += r.compressed
    assert compressed > 0 and session.summarized == compressed
    system = session.messages[0]
    assert system["role"] == "system" and system["content"].startswith("be brief")
    assert "Summary of the earlier conversation: " in system["content"]
    assert session.messages[-2]["content"] == "message number 11 with some words"
    session.reset()
    assert session.summary == "" and session.messages == [system | {"content": "be brief"}]


def test_message_longer_than_context_is_refused(session):
    with pytest.raises(GlassboxError, match="context window is 128"):
        session.send("hello " * 300)
    assert session.turns == []  # the refused message is not kept


def test_cli_chat_and_serve_are_registered(tiny_ckpt):
    runner = CliRunner()
    result = runner.invoke(app, ["chat", str(tiny_ckpt), "--max-tokens", "5"], input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "context [" in result.output and "tokens" in result.output
    assert runner.invoke(app, ["serve", "--help"]).exit_code == 0
