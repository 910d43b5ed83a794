"""`glassbox <command>`: each command is a typed function; errors exit non-zero cleanly."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from glassbox.cli_config import config_command
from glassbox.diffusion.cli import app as diffuse_app
from glassbox.errors import GlassboxError
from glassbox.rag.cli import register as register_rag
from glassbox.serve.commands import register as register_serving
from glassbox.train.pretrain import PretrainConfig
from glassbox.vision.cli import register as register_vision

app = typer.Typer(
    help="Glassbox: tokenizer, transformer, pretraining, generation, diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(help="Byte-level BPE tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(diffuse_app, name="diffuse")
register_serving(app)
register_rag(app)
register_vision(app)

DATA_HELP = "Corpus: builtin:stdlib|builtin:python|builtin:pydoc, a file, directory, glob or .jsonl"


# --------------------------------------------------------------------------------------
# Training commands: options generated from each recipe's config dataclass
# --------------------------------------------------------------------------------------


def _pretrain(cfg: PretrainConfig, explicit: set[str]) -> None:
    from glassbox.train.pretrain import pretrain

    last = pretrain(cfg, explicit)
    if last:
        if last.get("sample"):
            typer.echo(f"sample at step {last['step']}:\n{last['sample']}\n")
        typer.echo(
            f"done: step {last['step']}, val_loss {last.get('val_loss', float('nan')):.4f}, "
            f"val_bpb {last.get('val_bpb', float('nan')):.4f}; wrote {cfg.out}/ "
            "(model.safetensors, config.json, config.yaml, tokenizer.json, metrics.jsonl, "
            "loss.png)"
        )


def _diffuse_train(cfg, explicit: set[str]) -> None:
    from glassbox.train.diffusion import train

    run = train(cfg, explicit)
    typer.echo(f"trained: {run.out} (model.safetensors, loss.png, samples/)")


def _register_training_commands() -> None:
    """pretrain and diffuse train: options generated from their config dataclasses."""
    from glassbox.train.diffusion import PRESETS, DiffusionTrainConfig

    app.command(
        "pretrain",
        help="Pretrain a transformer on next-token prediction (default: Python's own sources).",
    )(config_command(PretrainConfig, _pretrain))
    diffuse_app.command(
        "train",
        help="Train a diffusion model; writes weights, metrics.jsonl, loss.png and sample grids.",
    )(config_command(DiffusionTrainConfig, _diffuse_train, presets=PRESETS))


_register_training_commands()


@app.command()
def generate(
    run_dir: Annotated[str, typer.Argument(help="Checkpoint directory.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens (default: rest of context).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    seed: int | None = None,
    truncate: Annotated[bool, typer.Option(help="Drop the oldest prompt tokens to fit.")] = False,
    device: str = "auto",
    dtype: Annotated[
        str, typer.Option(help="Precision: auto (measured on this machine), fp32, bf16, fp16.")
    ] = "auto",
    draft: Annotated[
        str | None, typer.Option(help="Speculative decoding: a smaller run, same tokenizer.")
    ] = None,
    prompt_lookup: Annotated[
        int, typer.Option(help="Speculative decoding from the context's n-grams (n; 0 = off).")
    ] = 0,
    num_speculative: Annotated[int, typer.Option(help="Tokens proposed per round.")] = 4,
    compile: Annotated[
        str, typer.Option(help="Compiled decode step: off, on, or auto (measured).")
    ] = "off",
) -> None:
    """Generate text token by token, streaming it to the terminal. With --draft or
    --prompt-lookup: speculative decoding (single stream; prints its acceptance rate)."""
    from glassbox.infer.generate import generate_text
    from glassbox.infer.sampling import SamplingParams
    from glassbox.serve.loading import load_for_decoding

    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    ).validate()  # fmt: skip
    log = lambda s: typer.secho(s, err=True, dim=True)  # noqa: E731
    model, tok, _ = load_for_decoding(run_dir, device, dtype, log)
    ids = [tok.eot_id, *tok.encode(prompt)]
    stream = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    sys.stdout.write(prompt)
    note = ""
    if draft or prompt_lookup:
        from glassbox.infer.speculative import (
            SpeculativeDecoder,
            check_same_tokenizer,
            speculative_generate_text,
        )

        draft_model = None
        if draft:
            draft_model, draft_tok, _ = load_for_decoding(draft, device, dtype, log)
            check_same_tokenizer(tok, draft_tok, run_dir, draft)
        decoder = SpeculativeDecoder(model, tok, draft_model, prompt_lookup, num_speculative)
        result = speculative_generate_text(
            decoder, ids, max_tokens, params, stop, truncate, on_text=stream
        )
        note = f"; single-stream {decoder.stats.summary()}"
    else:
        result = generate_text(
            model, tok, ids, max_tokens, params, stop, truncate, on_text=stream, compile=compile
        )
    sys.stdout.write("\n")
    log(
        f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
        f"prompt {result.prompt_tokens} tokens{note}]"
    )


@tokenizer_app.command("train")
def tokenizer_train(
    out: Annotated[str, typer.Option(help="Where to write tokenizer.json.")] = "tokenizer.json",
    data: Annotated[list[str] | None, typer.Option(help=DATA_HELP)] = None,
    text_field: str = "text",
    vocab_size: int = 4096,
) -> None:
    """Train a byte-level BPE tokenizer and report its compression (bytes per token)."""
    from glassbox.data.corpus import load_corpus
    from glassbox.tokenizer import Tokenizer

    docs = load_corpus(data or ["builtin:stdlib"], text_field)
    tok = Tokenizer.train([d.text for d in docs], vocab_size=vocab_size)
    tok.save(out)
    sample = "".join(d.text for d in docs[:: max(1, len(docs) // 50)])[:1_000_000]
    n = len(tok.encode(sample))
    typer.echo(
        f"wrote {out}: {tok.vocab_size} tokens; {len(sample.encode()) / max(1, n):.2f} bytes/token "
        f"on a {len(sample):,}-character sample"
    )


@app.command("export")
def export(
    run_dir: Annotated[str, typer.Argument(help="Checkpoint directory.")],
    out: Annotated[str, typer.Option(help="Directory to write.")],
    format: Annotated[str, typer.Option(help="Export format: hf.")] = "hf",
    force: Annotated[bool, typer.Option(help="Write into a non-empty --out.")] = False,
) -> None:
    """Export a checkpoint as a Hugging Face Llama directory (loads in transformers)."""
    from glassbox.interop.hf import export_hf

    if format != "hf":
        raise GlassboxError(f"--format={format!r} is not supported; use --format hf.")
    export_hf(run_dir, out, force=force)
    typer.echo(f"wrote {out}/ (config.json, model.safetensors, tokenizer files)")


@app.command("import")
def import_(
    hf_dir: Annotated[str, typer.Argument(help="Hugging Face Llama directory.")],
    out: Annotated[str, typer.Option(help="Glassbox checkpoint directory to write.")],
    force: Annotated[
        bool, typer.Option(help="Replace the run in a non-empty --out (its snapshots too).")
    ] = False,
) -> None:
    """Import any Hugging Face Llama-architecture directory (own tokenizer, chat template)."""
    from glassbox.interop.hf import import_hf

    import_hf(hf_dir, out, force=force)
    typer.echo(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json)")


def _register_sft() -> None:
    """`glassbox sft BASE --data ...`: supervised fine-tuning (chat full/LoRA, or domain)."""
    from glassbox.train.sft import SFTConfig

    def _sft(cfg: SFTConfig, explicit: set[str]) -> None:
        from glassbox.train.sft import sft

        last = sft(cfg, explicit)
        if last:
            keys = ("train_loss", "val_loss", "accuracy", "val_bpb", "orig_val_bpb")
            shown = ", ".join(f"{k} {last[k]:.4f}" for k in keys if k in last)
            typer.echo(f"done: step {last['step']}, {shown}; wrote {last['out']}/")

    app.command(
        "sft",
        help="Supervised fine-tuning from a trained model: chat data with the loss on "
        "assistant tokens (full, or LoRA with --lora-rank), or --mode domain on a corpus; "
        "writes an ordinary checkpoint (LoRA: merged weights + adapter.safetensors).",
    )(config_command(SFTConfig, _sft, positional="base"))


_register_sft()


def _register_reward() -> None:
    """`glassbox reward BASE`: a reward model trained on preference pairs."""
    from glassbox.train.reward import RewardConfig

    def _reward(cfg: RewardConfig, explicit: set[str]) -> None:
        from glassbox.train.reward import train_reward

        last = train_reward(cfg, explicit)
        if last:
            typer.echo(
                f"done: step {last['step']}, val_accuracy {last.get('val_accuracy', 0):.3f}, "
                f"val_margin {last.get('val_margin', 0):.3f} ({last['train_pairs']} training, "
                f"{last['val_pairs']} held-out pairs, {last['dropped']} too long); wrote "
                f"{cfg.out}/ (a reward checkpoint)"
            )

    app.command(
        "reward",
        help="Train a reward model (scalar head, Bradley-Terry loss) on preference pairs; "
        "PPO reads its checkpoint with --reward.",
    )(config_command(RewardConfig, _reward, positional="base"))


_register_reward()


def _register_dpo() -> None:
    """`glassbox dpo BASE`: direct preference optimization against a frozen reference."""
    from glassbox.train.dpo import DPOConfig

    def _dpo(cfg: DPOConfig, explicit: set[str]) -> None:
        from glassbox.train.dpo import train_dpo

        last = train_dpo(cfg, explicit)
        if last:
            tasks = (
                f", task_accuracy {last['task_accuracy']:.3f}" if "task_accuracy" in last else ""
            )
            typer.echo(
                f"done: step {last['step']}, val_accuracy {last.get('val_accuracy', 0):.3f}, "
                f"val_margin {last.get('val_margin', 0):.3f}{tasks} ({last['train_pairs']} "
                f"training, {last['val_pairs']} held-out pairs, {last['dropped']} too long); "
                f"wrote {cfg.out}/"
            )

    app.command(
        "dpo",
        help="Direct preference optimization (sigmoid or IPO loss) on preference pairs; "
        "writes an ordinary language-model checkpoint.",
    )(config_command(DPOConfig, _dpo, positional="base"))


_register_dpo()


def _register_ppo() -> None:
    """`glassbox ppo BASE --reward RM_DIR`: PPO against a reward model, with a KL anchor."""
    from glassbox.train.ppo import PPOConfig

    def _ppo(cfg: PPOConfig, explicit: set[str]) -> None:
        from glassbox.train.ppo import run

        last = run(cfg, explicit)
        _report_rl(cfg.out, last, ("rm_score", "true_accuracy", "kl", "heldout_accuracy"))

    app.command(
        "ppo",
        help="PPO from a trained model against a reward model (--reward), with a KL penalty "
        "to the starting model; writes an ordinary checkpoint and overoptimization.png.",
    )(config_command(PPOConfig, _ppo, positional="base"))


def _report_rl(out: str, last: dict, keys: tuple[str, ...]) -> None:
    """The last metrics row of an RL run, one line."""
    if last:
        shown = ", ".join(f"{k} {last[k]:.3f}" for k in keys if k in last)
        typer.echo(f"done: step {last['step']}, {shown}; wrote {out}/")


_register_ppo()


def _register_grpo() -> None:
    """`glassbox grpo BASE --tasks builtin:tasks`: GRPO on the task checkers' rewards."""
    from glassbox.train.grpo import GRPOConfig

    def _grpo(cfg: GRPOConfig, explicit: set[str]) -> None:
        from glassbox.train.grpo import run

        last = run(cfg, explicit)
        _report_rl(cfg.out, last, ("reward", "heldout_accuracy"))

    app.command(
        "grpo",
        help="GRPO from a trained model on verifiable tasks (rewards from their checkers, "
        "group-relative advantages, no critic); writes an ordinary checkpoint.",
    )(config_command(GRPOConfig, _grpo, positional="base"))


_register_grpo()


def _register_eval() -> None:
    """`glassbox eval RUN_DIR --tasks ...`: checker accuracy and pass@k per task family."""

    @app.command("eval")
    def eval_(
        run_dir: Annotated[str, typer.Argument(help="Checkpoint directory.")],
        tasks: Annotated[
            str, typer.Option(help="builtin:tasks, builtin:humaneval-sample or a .jsonl file.")
        ] = "builtin:tasks",
        split: Annotated[str, typer.Option(help="builtin:tasks split: heldout or train.")] = (
            "heldout"
        ),
        limit: Annotated[int | None, typer.Option(help="At most N tasks per family.")] = None,
        family: Annotated[
            list[str] | None, typer.Option(help="Only these families (repeatable).")
        ] = None,
        n: Annotated[int, typer.Option(help="Samples per task.")] = 1,
        k: Annotated[list[int] | None, typer.Option(help="pass@k to report (repeatable).")] = None,
        temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
        max_tokens: Annotated[int, typer.Option(help="New tokens per completion.")] = 64,
        seed: int = 0,
        max_seqs: Annotated[int, typer.Option(help="Sequences decoded at once.")] = 16,
        workers: Annotated[int, typer.Option(help="Code checks run in parallel.")] = 2,
        out: Annotated[
            str | None,
            typer.Option(help="Report JSON (default: RUN_DIR/eval_<tasks>_<split>.json)."),
        ] = None,
        device: str = "auto",
    ) -> None:
        """Evaluate a model on verifiable tasks; print the table and write the JSON report
        (per family and overall, plus every sample's completion and score) to --out, by
        default RUN_DIR/eval_<tasks>_<split>.json (e.g. eval_builtin-tasks_heldout.json,
        eval_mine_heldout.json for mine.jsonl)."""
        from pathlib import Path

        from glassbox.checkpoint import atomic_write_bytes, load_model_dir
        from glassbox.device import resolve_device
        from glassbox.tasks import load_tasks
        from glassbox.tasks.evaluate import evaluate, limit_per_family

        chosen = limit_per_family(load_tasks(tasks, split=split), limit)
        if family:
            known = sorted({t.family for t in chosen})
            unknown = sorted(set(family) - set(known))
            if unknown:
                raise GlassboxError(f"--family {unknown} not in {tasks}; choose from {known}.")
            chosen = [t for t in chosen if t.family in family]
        model, tok, _ = load_model_dir(run_dir, resolve_device(device))
        report = evaluate(
            model, tok, chosen, n=n, k=tuple(k or [1]), temperature=temperature,
            max_tokens=max_tokens, seed=seed, max_seqs=max_seqs, workers=workers,
        )  # fmt: skip
        name = tasks.replace(":", "-") if tasks.startswith("builtin:") else Path(tasks).stem
        path = Path(out) if out else Path(run_dir) / f"eval_{name}_{split}.json"
        atomic_write_bytes(path, report.to_json().encode())
        typer.echo(report.table())
        typer.echo(f"wrote {path}")


_register_eval()


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, no traceback."""
    try:
        app()
    except GlassboxError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
