"""Drive the CLI the way the README does, on a tiny config, always in a temporary folder."""

import json
import subprocess
import sys

import pytest
import yaml


def glassbox(*args, cwd, timeout=300):
    """Run the CLI as a user would, in ``cwd`` (a temporary directory: never the repo)."""
    cmd = [sys.executable, "-m", "glassbox.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return proc


TINY = [
    "--data", "builtin:pydoc", "--model", "test", "--vocab-size", "512", "--max-steps", "12",
    "--eval-interval", "6", "--eval-tokens", "2048", "--batch-size", "4",
    "--sample-tokens", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli")
    proc = ok(glassbox("pretrain", "--out", "base", *TINY, cwd=home))
    assert "val_bpb" in proc.stdout
    return home / "base"


def test_pretrain_writes_a_run_directory(run_dir):
    names = ("model.safetensors", "config.json", "config.yaml", "tokenizer.json", "metrics.jsonl")
    for name in (*names, "loss.png"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and "val_bpb" in rows[-1]


def test_generate_streams_text(run_dir, tmp_path):
    args = ("generate", run_dir, "--prompt", "def fibonacci(n):", "--max-tokens", "20",
            "--temperature", "0.8", "--top-p", "0.95", "--seed", "1")  # fmt: skip
    proc = ok(glassbox(*args, cwd=tmp_path))
    assert proc.stdout.startswith("def fibonacci(n):")
    assert len(proc.stdout) > len("def fibonacci(n):\n")
    assert "finish_reason=" in proc.stderr
    assert ok(glassbox(*args, cwd=tmp_path)).stdout == proc.stdout


def test_export_and_import(run_dir, tmp_path):
    ok(glassbox("export", run_dir, "--format", "hf", "--out", "hf", cwd=tmp_path))
    assert (tmp_path / "hf" / "config.json").is_file()
    ok(glassbox("import", "hf", "--out", "back", cwd=tmp_path))
    greedy = ("--prompt", "x", "--max-tokens", "8", "--temperature", "0")
    a = ok(glassbox("generate", run_dir, *greedy, cwd=tmp_path))
    b = ok(glassbox("generate", "back", *greedy, cwd=tmp_path))
    assert a.stdout == b.stdout
    # Neither command overwrites what is there unless asked.
    assert_clean_error(glassbox("import", "hf", "--out", "back", cwd=tmp_path), "--force")
    ok(glassbox("import", "hf", "--out", "back", "--force", cwd=tmp_path))
    assert_clean_error(glassbox("export", run_dir, "--out", run_dir, cwd=tmp_path), "--out")


def test_tokenizer_train(tmp_path):
    proc = ok(glassbox("tokenizer", "train", "--data", "builtin:pydoc", "--vocab-size", "600",
                       "--out", "tok.json", cwd=tmp_path))  # fmt: skip
    assert "bytes/token" in proc.stdout and (tmp_path / "tok.json").is_file()


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_clear_errors(run_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(glassbox("pretrain", "--out", "a", "--data", "empty.txt", cwd=tmp_path),
                       "empty")  # fmt: skip
    assert_clean_error(glassbox("pretrain", "--out", "b", "--data", "missing.txt", cwd=tmp_path),
                       "does not exist")  # fmt: skip
    long_prompt = "word " * 200  # far more than the 64-token context
    assert_clean_error(
        glassbox("generate", run_dir, "--prompt", long_prompt, "--max-tokens", "10", cwd=tmp_path),
        "context window is 64 tokens",
        "new tokens",
    )
    assert_clean_error(glassbox("generate", "nowhere", cwd=tmp_path), "does not exist")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert_clean_error(glassbox("generate", "broken", cwd=tmp_path), "config.json")
    assert_clean_error(glassbox("generate", run_dir, "--top-p", "2", cwd=tmp_path), "top_p=2.0")
    assert_clean_error(glassbox("pretrain", "--model", "huge", cwd=tmp_path),
                       "Unknown model preset")  # fmt: skip
    truncated = glassbox(
        "generate", run_dir, "--prompt", long_prompt, "--max-tokens", "10", "--truncate",
        cwd=tmp_path,
    )  # fmt: skip
    ok(truncated)


def test_resume_and_out_rules_from_the_command_line(run_dir, tmp_path):
    assert_clean_error(glassbox("pretrain", "--out", run_dir, *TINY, cwd=tmp_path),
                       "already holds a run", "--resume")  # fmt: skip
    assert_clean_error(
        glassbox("pretrain", "--out", run_dir, "--resume", "--model", "tiny", cwd=tmp_path),
        "--model 'test' -> 'tiny'",
    )
    assert_clean_error(glassbox("pretrain", "--out", "new", "--resume", cwd=tmp_path),
                       "no snapshot")  # fmt: skip


def test_config_file_print_config_and_overrides(run_dir, tmp_path):
    printed = ok(glassbox("pretrain", "--print-config", "--lr", "3e-3", cwd=tmp_path)).stdout
    settings = yaml.safe_load(printed)
    assert settings["lr"] == 0.003 and settings["model"] == "tiny"
    assert "# Peak learning rate." in printed  # each knob with its help
    # A run's own config.yaml, with flags over it.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == "test" and saved["max_steps"] == 12 and "out" not in saved
    shown = yaml.safe_load(
        ok(
            glassbox(
                "pretrain",
                "--config",
                run_dir / "config.yaml",
                "--lr",
                "0.001",
                "--print-config",
                cwd=tmp_path,
            )
        ).stdout
    )
    assert shown["model"] == "test" and shown["lr"] == 0.001 and shown["max_steps"] == 12
    (tmp_path / "bad.yaml").write_text("learning_rate: 3\n")
    assert_clean_error(glassbox("pretrain", "--config", "bad.yaml", cwd=tmp_path),
                       "learning_rate")  # fmt: skip
    shown = yaml.safe_load(
        ok(glassbox("diffuse", "train", "--preset", "tiny", "--print-config", cwd=tmp_path)).stdout
    )
    assert shown["max_steps"] == 4 and shown["batch_size"] == 8
