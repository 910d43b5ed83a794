"""`glassbox rag index|search|ask`, `glassbox summarize` and `glassbox probe` (registered
by glassbox.cli): working past the context window, and measuring how models fail."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(
    help="Retrieval: chunk and index documents, answer from them.", no_args_is_help=True
)

ModeOpt = Annotated[str, typer.Option(help="bm25, dense or hybrid (reciprocal rank fusion).")]


def _load(run_dir: str, device: str):
    from glassbox.checkpoint import load_model_dir
    from glassbox.device import resolve_device

    model, tok, _ = load_model_dir(run_dir, resolve_device(device))
    return model, tok


class _Bytes:
    """Chunking without a model: every UTF-8 byte is one token."""

    eot_id = 0

    def encode_with_offsets(self, text: str):
        ids, offsets = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += list(b)
            offsets += [(i, i + 1)] * len(b)
        return ids, offsets


@app.command("index")
def index(
    data: Annotated[
        list[str], typer.Argument(help="Documents: files, dirs, globs, .jsonl, builtin:world...")
    ],
    out: Annotated[str, typer.Option(help="Index directory to write.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint whose tokenizer sizes the chunks and whose hidden states give "
            "dense vectors (none: BM25 only, sizes in bytes)."
        ),
    ] = None,
    size: Annotated[int, typer.Option(help="Chunk size in tokens.")] = 128,
    overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 16,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl documents.")] = "text",
    device: str = "auto",
) -> None:
    """Chunk documents and build a BM25 (+ dense, with --model) index."""
    from glassbox.data.corpus import load_corpus
    from glassbox.rag.chunking import check_sizes, chunk_documents
    from glassbox.rag.index import Embedder, build_index

    check_sizes(size, overlap)
    docs = load_corpus(data, text_field)
    if model:
        lm, tok = _load(model, device)
        chunks, embedder = chunk_documents(docs, tok, size, overlap), Embedder(lm, tok)
    else:
        chunks, embedder = chunk_documents(docs, _Bytes(), size, overlap), None  # type: ignore[arg-type]
    meta = {"data": data, "model": model, "size": size, "overlap": overlap,
            "unit": "tokens" if model else "bytes"}  # fmt: skip
    idx = build_index(chunks, embedder, meta)
    path = idx.save(out)
    kind = "BM25 + dense" if embedder else "BM25"
    typer.echo(f"{len(docs)} documents -> {len(chunks)} chunks ({kind}) -> {path}")


@app.command("search")
def search(
    index_dir: Annotated[str, typer.Argument(help="Index directory.")],
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option(help="Chunks to return.")] = 5,
    mode: ModeOpt = "hybrid",
    device: str = "auto",
) -> None:
    """Print the best chunks for a query, with scores."""
    from glassbox.rag.index import Embedder, Index

    idx = Index.load(index_dir)
    embedder = None
    if mode != "bm25" and idx.embeddings is not None:
        embedder = Embedder(*_load(idx.meta["model"], device))
    for hit in idx.search(query, k, mode, embedder):  # type: ignore[arg-type]
        text = hit.chunk.text.replace("\n", " ")
        typer.echo(f"{hit.rank + 1}. {hit.chunk.id}  score {hit.score:.4f}\n   {text[:200]}")


@app.command("ask")
def ask(
    run_dir: Annotated[str, typer.Argument(help="Checkpoint that answers (a chat model).")],
    question: Annotated[str, typer.Argument(help="The question.")],
    index_dir: Annotated[str, typer.Option("--index", help="Index directory.")],
    k: Annotated[int, typer.Option(help="Chunks to retrieve.")] = 5,
    mode: ModeOpt = "hybrid",
    max_tokens: Annotated[int, typer.Option(help="Tokens of the answer.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    device: str = "auto",
) -> None:
    """Answer a question from retrieved chunks, citing them as [n]."""
    from glassbox.infer.sampling import SamplingParams
    from glassbox.rag.answer import answer
    from glassbox.rag.index import Embedder, Index

    idx = Index.load(index_dir)
    model, tok = _load(run_dir, device)
    embedder = None
    if mode != "bm25" and idx.embeddings is not None:
        same = idx.meta.get("model") == run_dir
        embedder = Embedder(model, tok) if same else Embedder(*_load(idx.meta["model"], device))
    res = answer(
        model, tok, idx, question, k, mode, max_tokens,  # type: ignore[arg-type]
        SamplingParams(temperature=temperature),
        embedder, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
    )  # fmt: skip
    sys.stdout.write("\n")
    p = res.prompt
    for n, hit in enumerate(p.used, 1):
        cut = " (cut to fit)" if hit in p.cut else ""
        typer.secho(f"[{n}] {hit.chunk.id}{cut}", err=True, dim=True)
    typer.secho(
        f"[prompt {len(p.ids)} of {model.cfg.context_length} tokens, {len(p.used)} chunks used, "
        f"{len(p.dropped)} left out; cites {res.citations() or 'nothing'}]",
        err=True, dim=True,
    )  # fmt: skip


def summarize_command(
    run_dir: Annotated[str, typer.Argument(help="Checkpoint that summarizes (a chat model).")],
    path: Annotated[str, typer.Argument(help="Text file to summarize, any length.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens per summary.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    device: str = "auto",
) -> None:
    """Summarize a text of any length by map-reduce over chunks that fit the window."""
    from pathlib import Path

    from glassbox.errors import GlassboxError
    from glassbox.infer.sampling import SamplingParams
    from glassbox.rag.summarize import summarize

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GlassboxError(f"Cannot read {path} as UTF-8 text: {e}.") from e
    model, tok = _load(run_dir, device)
    res = summarize(
        model, tok, text, max_tokens, SamplingParams(temperature=temperature),
        on_round=lambda r, n: typer.secho(f"round {r}: {n} chunk(s)", err=True, dim=True),
    )  # fmt: skip
    typer.echo(res.text)
    note = ", input cut to fit" if res.truncated else ""
    typer.secho(f"[{len(res.rounds)} round(s): {res.rounds} chunks{note}]", err=True, dim=True)


def probe_command(
    name: Annotated[
        str,
        typer.Argument(
            help="hallucination, sycophancy, needle, cutoff, "
            "paraphrase, sampling, or scale (trains its own runs)."
        ),
    ],
    runs: Annotated[
        list[str] | None, typer.Argument(help="Checkpoint(s) to probe, compared side by side.")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Folder for JSON + PNG (default RUN/probes).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="At most N questions (where it applies).")
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="cutoff: a news index (default: built from builtin:world-news)."),
    ] = None,
    steps: Annotated[int, typer.Option(help="scale: optimizer steps per preset.")] = 300,
    preset: Annotated[
        list[str] | None, typer.Option(help="scale: presets to train (repeatable).")
    ] = None,
    data: Annotated[str, typer.Option(help="scale: corpus.")] = "builtin:pydoc",
    device: str = "auto",
) -> None:
    """Reproduce a failure mode on the generated world: a headline, JSON and a figure."""
    from pathlib import Path

    from glassbox.errors import GlassboxError
    from glassbox.probes import PROBES, run_probe, scale

    if name == "scale":
        if runs:
            raise GlassboxError("probe scale trains its own runs; pass --out DIR, not runs.")
        if not out:
            raise GlassboxError("probe scale needs --out DIR for its runs, JSON and figure.")
        result, figure = scale(out, tuple(preset or ("test", "tiny", "small")), data, steps)
        path = result.write(out, figure)
        typer.echo(result.headline)
        typer.secho(f"  wrote {path} and {path.with_suffix('.png')}", dim=True)
        return
    if name not in PROBES:
        raise GlassboxError(f"Unknown probe {name!r}; choose one of {[*PROBES, 'scale']}.")
    if not runs:
        raise GlassboxError(f"probe {name} needs a checkpoint: glassbox probe {name} RUN.")
    for run in runs:
        model, tok = _load(run, device)
        kwargs: dict = {}
        if limit is not None and name in ("hallucination", "sycophancy", "paraphrase", "sampling"):
            kwargs["limit"] = limit
        if name == "cutoff" and index:
            from glassbox.rag.index import Index

            kwargs["index"] = Index.load(index)
        result, figure = run_probe(name, model, tok, **kwargs)
        if out:
            folder = Path(out) / Path(run).name if len(runs) > 1 else Path(out)
        else:
            folder = Path(run) / "probes"
        path = result.write(folder, figure)
        typer.echo(f"{run}: {result.headline}")
        typer.secho(f"  wrote {path} and {path.with_suffix('.png')}", dim=True)


def register(main: typer.Typer) -> None:
    main.add_typer(app, name="rag")
    main.command("summarize")(summarize_command)
    main.command("probe")(probe_command)
