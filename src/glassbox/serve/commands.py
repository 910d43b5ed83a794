"""`glassbox serve` and `glassbox chat` (registered on the main CLI by glassbox.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the serving commands to the main CLI app."""
