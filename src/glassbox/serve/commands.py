"""`glassbox serve` and `glassbox chat` (registered on the main CLI by glassbox.cli)."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    checkpoints: Annotated[
        list[str], typer.Argument(help="Checkpoint dirs to serve, as PATH or NAME=PATH.")
    ],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1/*.")
    ] = None,
    max_seqs: Annotated[int, typer.Option(help="Sequences decoded together (KV slots).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 64,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Allowed CORS origin (repeatable); off if none.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Serve checkpoints over an OpenAI-compatible HTTP API (/v1/chat/completions ...)."""
    import uvicorn

    from glassbox.serve.app import create_app, load_served_models

    models = load_served_models(checkpoints, device, max_seqs, max_queue)
    app = create_app(models, api_key, cors_origin, max_body_bytes)
    names = ", ".join(models)
    typer.echo(f"serving {names} at http://{host}:{port}/v1 (docs: http://{host}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def chat(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory.")],
    system: Annotated[str | None, typer.Option(help="System prompt (always kept).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int | None = None,
    device: str = "auto",
) -> None:
    """Chat in the terminal: history, streaming, and a context-window meter."""
    from glassbox.serve.chat import run_chat

    run_chat(checkpoint, system, max_tokens, temperature, top_p, top_k, seed, device)


def register(app: typer.Typer) -> None:
    """Add the serving commands to the main CLI app."""
    app.command()(serve)
    app.command()(chat)
