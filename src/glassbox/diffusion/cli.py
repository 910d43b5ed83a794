"""`glassbox diffuse ...` commands."""

import typer

app = typer.Typer(help="Image generation by diffusion.", no_args_is_help=True)
