"""Drive the CLI the way the README does, on a tiny config."""

import json
import subprocess
import sys

import pytest


def glassbox(*args, timeout=300):
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "base"
    proc = glassbox(
        "pretrain", "--out", out, "--data", "builtin:pydoc", "--model", "test",
        "--vocab-size", "512", "--max-steps", "12", "--eval-interval", "6",
        "--eval-tokens", "2048", "--batch-size", "4", "--sample-tokens", "16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_bpb" in proc.stdout
    return out


def test_pretrain_writes_a_run_directory(run_dir):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and "val_bpb" in rows[-1]


def test_generate_streams_text(run_dir):
    proc = glassbox(
        "generate", run_dir, "--prompt", "def fibonacci(n):", "--max-tokens", "20",
        "--temperature", "0.8", "--top-p", "0.95", "--seed", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):")
    assert "finish_reason=" in proc.stderr
    again = glassbox(
        "generate", run_dir, "--prompt", "def fibonacci(n):", "--max-tokens", "20",
        "--temperature", "0.8", "--top-p", "0.95", "--seed", "1",
    )  # fmt: skip
    assert again.stdout == proc.stdout


def test_export_and_import(run_dir, tmp_path):
    assert glassbox("export", run_dir, "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert glassbox("import", tmp_path / "hf", "--out", tmp_path / "back").returncode == 0
    a = glassbox("generate", run_dir, "--prompt", "x", "--max-tokens", "8", "--temperature", "0")
    b = glassbox(
        "generate", tmp_path / "back", "--prompt", "x", "--max-tokens", "8", "--temperature", "0"
    )
    assert a.stdout == b.stdout


def test_tokenizer_train(tmp_path):
    proc = glassbox(
        "tokenizer", "train", "--data", "builtin:pydoc", "--vocab-size", "600",
        "--out", tmp_path / "tok.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "bytes/token" in proc.stdout and (tmp_path / "tok.json").is_file()


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_clear_errors(run_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(glassbox("pretrain", "--data", tmp_path / "empty.txt"), "empty")
    assert_clean_error(glassbox("pretrain", "--data", tmp_path / "missing.txt"), "does not exist")
    long_prompt = "word " * 200  # far more than the 64-token context
    assert_clean_error(
        glassbox("generate", run_dir, "--prompt", long_prompt, "--max-tokens", "10"),
        "context window is 64 tokens",
        "new tokens",
    )
    assert_clean_error(glassbox("generate", tmp_path / "nowhere"), "does not exist")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert_clean_error(glassbox("generate", tmp_path / "broken"), "config.json")
    assert_clean_error(glassbox("generate", run_dir, "--top-p", "2"), "top_p=2.0")
    assert_clean_error(glassbox("pretrain", "--model", "huge"), "Unknown model preset")
    truncated = glassbox(
        "generate", run_dir, "--prompt", long_prompt, "--max-tokens", "10", "--truncate"
    )
    assert truncated.returncode == 0, truncated.stderr
