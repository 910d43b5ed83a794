"""`glassbox serve` and `glassbox chat` (registered on the main CLI by glassbox.cli)."""

from __future__ import annotations

from typing import Annotated

import typer

DTYPE_HELP = "Weights' precision: auto (measured on this machine), fp32, bf16 or fp16."


def serve(
    checkpoints: Annotated[
        list[str],
        typer.Argument(
            help="Runs to serve (language, vision-language or contrastive), as PATH or NAME=PATH."
        ),
    ],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="GLASSBOX_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every path but /health and /docs. "
            "Prefer the GLASSBOX_API_KEY variable: a flag is visible in `ps`.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Host name clients may address besides localhost (repeatable; "
            "'*' = any). Checked always without a key, with a key only if given."
        ),
    ] = None,  # fmt: skip
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="Allow a non-loopback --host without an API key.")
    ] = False,
    root_path: Annotated[str, typer.Option(help="Path prefix set by a reverse proxy.")] = "",
    max_seqs: Annotated[int, typer.Option(help="Sequences decoded together (KV slots).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 64,
    max_batched_tokens: Annotated[
        int, typer.Option(help="Tokens per engine step: decode + prompt chunks.")
    ] = 256,
    compile: Annotated[
        str, typer.Option(help="Compiled decode step: off, on, or auto (measured at start).")
    ] = "off",
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413).")] = 1 << 20,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Allowed CORS origin (repeatable); off if none.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    max_n: Annotated[int, typer.Option(help="Largest n (choices per prompt).")] = 16,
    max_prompts: Annotated[int, typer.Option(help="Prompts in one /v1/completions.")] = 16,
    max_sequences: Annotated[int, typer.Option(help="Prompts x n in one request.")] = 64,
    max_logprobs: Annotated[int, typer.Option(help="Largest completions logprobs.")] = 5,
    max_top_logprobs: Annotated[int, typer.Option(help="Largest chat top_logprobs.")] = 20,
    max_messages: Annotated[int, typer.Option(help="Chat messages per request.")] = 1024,
    max_prompt_chars: Annotated[
        int, typer.Option(help="Prompt characters per request, before tokenizing.")
    ] = 200_000,
    max_logit_bias: Annotated[int, typer.Option(help="logit_bias entries.")] = 300,
    max_stop: Annotated[int, typer.Option(help="Stop strings per request.")] = 8,
    max_stop_chars: Annotated[int, typer.Option(help="Characters in one stop string.")] = 256,
    max_schema_bytes: Annotated[
        int, typer.Option(help="Size of a JSON schema/regex/choice list, as JSON.")
    ] = 32_768,
    max_schema_depth: Annotated[int, typer.Option(help="Nesting of a JSON schema.")] = 64,
    max_tools: Annotated[int, typer.Option(help="Tools in one chat request.")] = 128,
    max_images: Annotated[int, typer.Option(help="image_url parts in one request.")] = 4,
    max_image_bytes: Annotated[int, typer.Option(help="Bytes of one decoded image.")] = 512 * 1024,
    max_image_pixels: Annotated[
        int, typer.Option(help="Width x height of one image (checked before decoding).")
    ] = 2048 * 2048,
    grammar_timeout: Annotated[float, typer.Option(help="Seconds to compile a grammar.")] = 10.0,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds per request, arrival to last token (0 = none).")
    ] = 600.0,
    max_queue_wait: Annotated[
        float, typer.Option(help="Seconds a request may wait for its first token (0 = none).")
    ] = 120.0,
    playground: Annotated[
        bool, typer.Option(help="Serve the playground page at / (docs/playground.md).")
    ] = False,
    arena_dir: Annotated[
        str, typer.Option(help="Where the playground's arena appends votes (JSONL).")
    ] = "runs/arena",
    diffusion: Annotated[
        list[str] | None,
        typer.Option(help="Diffusion run for the playground's Images view (PATH or NAME=PATH)."),
    ] = None,
    vlm: Annotated[
        list[str] | None,
        typer.Option(help="Vision-language run (`glassbox vlm train`) for the playground."),
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds to let running requests finish.")
    ] = 30.0,
) -> None:
    """Serve checkpoints over an OpenAI-compatible HTTP API (/v1/chat/completions ...)."""
    import logging

    import uvicorn

    from glassbox.errors import GlassboxError
    from glassbox.serve.app import create_app, load_served_models
    from glassbox.serve.limits import ServeLimits

    if api_key is None and not is_loopback(host) and not allow_unauthenticated:
        raise GlassboxError(
            f"--host {host} is reachable from other machines, and no API key is set. Set "
            "GLASSBOX_API_KEY (or --api-key), or pass --allow-unauthenticated if a proxy in "
            "front of the server does authentication."
        )
    try:
        limits = ServeLimits(
            max_n=max_n, max_prompts=max_prompts, max_sequences=max_sequences,
            max_logprobs=max_logprobs, max_top_logprobs=max_top_logprobs,
            max_messages=max_messages, max_prompt_chars=max_prompt_chars,
            max_logit_bias=max_logit_bias, max_stop=max_stop, max_stop_chars=max_stop_chars,
            max_schema_bytes=max_schema_bytes, max_schema_depth=max_schema_depth,
            max_tools=max_tools, max_images=max_images, max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            grammar_timeout=grammar_timeout, request_timeout=request_timeout or None,
            max_queue_wait=max_queue_wait or None,
        )  # fmt: skip
    except ValueError as e:
        raise GlassboxError(f"Invalid limit: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    models = load_served_models(
        checkpoints, device, max_seqs, max_queue, dtype, max_batched_tokens, compile
    )
    runs, vision = None, None
    if (diffusion or vlm) and not playground:
        raise GlassboxError("--diffusion and --vlm serve runs to the playground; add --playground.")
    if diffusion:
        from glassbox.serve.endpoints.playground_diffusion import load_diffusion_runs

        runs = load_diffusion_runs(diffusion, device)
    if vlm:
        from glassbox.serve.endpoints.playground_vision import load_vision_runs

        vision = load_vision_runs(vlm, device)
    app = create_app(models, api_key, cors_origin, max_body_bytes, limits, allowed_host,
                     playground=playground, arena_dir=arena_dir, diffusion=runs,
                     vision=vision)  # fmt: skip
    names = ", ".join(models)
    if api_key is None and not is_loopback(host):
        typer.echo(f"WARNING: serving on {host} WITHOUT an API key.", err=True)
    typer.echo(f"serving {names} at http://{host}:{port}{root_path}/v1 "
               f"(docs: http://{host}:{port}{root_path}/docs)")  # fmt: skip
    if playground:
        typer.echo(f"playground: http://{host}:{port}{root_path}/ (votes: {arena_dir})")
    # uvicorn stops accepting on SIGTERM/SIGINT, lets running requests finish for up to
    # drain_timeout seconds, then cancels them (their engine sequences are aborted).
    uvicorn.run(
        app, host=host, port=port, log_level="warning", root_path=root_path,
        timeout_graceful_shutdown=drain_timeout,
    )  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def chat(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory.")],
    system: Annotated[str | None, typer.Option(help="System prompt (always kept).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int | None = None,
    device: str = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    compress: Annotated[
        bool, typer.Option(help="When the window fills, summarize the oldest turns, not drop them.")
    ] = False,
) -> None:
    """Chat in the terminal: history, streaming, and a context-window meter."""
    from glassbox.serve.chat import run_chat

    run_chat(
        checkpoint, system, max_tokens, temperature, top_p, top_k, seed, device, dtype, compress
    )


def register(app: typer.Typer) -> None:
    """Add the serving commands to the main CLI app."""
    app.command()(serve)
    app.command()(chat)
