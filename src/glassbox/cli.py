"""`glassbox <command>`: each command is a typed function; errors exit non-zero cleanly."""

from __future__ import annotations

import sys

import typer

from glassbox.diffusion.cli import app as diffuse_app
from glassbox.errors import GlassboxError

app = typer.Typer(
    help="Glassbox: tokenizer, transformer, pretraining, generation, diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(diffuse_app, name="diffuse")


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
