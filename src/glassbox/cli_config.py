"""Command-line options generated from a recipe's config dataclass.

Every field becomes ``--field-name`` (its attribute docstring is the help text), so a
field without a flag cannot exist. On top of the fields:

    --config FILE.yaml   values from a YAML mapping (a run's own config.yaml works)
    --print-config       print every knob with its value and help as YAML, then exit
    --preset NAME        (recipes with presets) a named starting point

Precedence: dataclass default < preset < --config file < flags on the command line.
The recipe receives the config and the set of fields the user gave (file or flags), so
that ``--resume`` can tell a deliberate change from a default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # recent typer releases carry their own copy of click
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.core import ParameterSource

from glassbox.errors import GlassboxError

NONE_WORDS = ("none", "null", "all", "off")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_optional(inner: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
            return None
        return inner(value)

    return parse


def _parse_json(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        example = '{"channels": 16}'
        raise typer.BadParameter(f"{value!r} is not JSON ({e}); write e.g. '{example}'") from e
    if not isinstance(out, dict):
        raise typer.BadParameter(f"{value!r} must be a JSON object")
    return out


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise typer.BadParameter(f"{value!r} is not true or false")


_SCALARS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str}


@dataclasses.dataclass
class _Field:
    """How one config field reads from text (flags) and from YAML values."""

    name: str
    annotation: Any  # what typer sees
    option: Any  # typer.Option(...)
    convert: Callable[[Any], Any]  # for values from a --config file
    default: Any


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _field_option(f: dataclasses.Field, tp: Any, help: str) -> _Field:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    default = _default(f)
    shown = "none" if default is None else default
    help = f"{help} (default: {shown})".strip()
    if tp is bool:
        option = typer.Option(help=help, show_default=False)
        return _Field(f.name, bool, option, _parse_bool, default)
    if origin is list:
        inner = _SCALARS[args[0]]
        option = typer.Option(help=help + " (repeatable)", show_default=False)
        convert = lambda v: [inner(x) for x in (v if isinstance(v, list | tuple) else [v])]  # noqa: E731
        return _Field(f.name, list[args[0]] | None, option, convert, None)
    if tp is dict or origin is dict:
        option = typer.Option(parser=_parse_json, help=help, show_default=False, metavar="JSON")
        return _Field(f.name, dict | None, option, _parse_json, None)
    scalar = _SCALARS[tp]
    parse = _parse_optional(scalar) if optional else scalar
    metavar = tp.__name__.upper() + ("|none" if optional else "")
    option = typer.Option(parser=parse, help=help, show_default=False, metavar=metavar)
    return _Field(f.name, tp | None if optional else tp, option, parse, default)


def load_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """A YAML (or JSON) mapping of field values; unknown keys are refused by name."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"--config {path} does not exist; pass a YAML file of settings.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise GlassboxError(f"--config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise GlassboxError(f"--config {path} must hold a mapping of setting: value.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise GlassboxError(
            f"--config {path} has unknown settings {unknown}; see --print-config for the "
            "valid names."
        )
    return data


def print_config(cfg: Any) -> str:
    """Every field as YAML, each with its help as a comment above it."""
    import yaml

    docs = field_docs(type(cfg))
    lines = [f"# {type(cfg).__name__}: pass this file back with --config"]
    for f in dataclasses.fields(cfg):
        if docs.get(f.name):
            lines.append(f"# {docs[f.name]}")
        value = getattr(cfg, f.name)
        value = list(value) if isinstance(value, tuple) else value
        lines.append(yaml.safe_dump({f.name: value}, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


def config_command(
    cls: type,
    run: Callable[[Any, set[str]], None],
    presets: dict[str, dict[str, Any]] | None = None,
    positional: str | None = None,
) -> Callable[..., None]:
    """A typer command function whose options are ``cls``'s fields; it calls
    ``run(cfg, explicit)``. Register it with ``app.command(name, help=...)(fn)``.

    ``positional`` names one field taken as the command's argument instead of a flag
    (``glassbox sft runs/base``: the checkpoint to start from)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = [
        _field_option(f, hints[f.name], docs.get(f.name, "")) for f in dataclasses.fields(cls)
    ]
    if positional is not None:
        i = next(i for i, f in enumerate(fields) if f.name == positional)
        arg = typer.Argument(help=docs.get(positional, ""), show_default=False)
        fields[i] = dataclasses.replace(fields[i], option=arg)
        fields.insert(0, fields.pop(i))  # arguments come first in the signature
    by_name = {f.name: f for f in fields}
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    ]
    params += [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == positional else kw,
            default=f.default,
            annotation=Annotated[f.annotation, f.option],
        )
        for f in fields
    ]
    params.append(
        inspect.Parameter("config", kw, default=None, annotation=Annotated[
            str | None, typer.Option(help="YAML file of settings (flags override it).")])
    )  # fmt: skip
    params.append(
        inspect.Parameter("print_config", kw, default=False, annotation=Annotated[
            bool, typer.Option("--print-config", help="Print every setting as YAML and exit.")])
    )  # fmt: skip
    if presets:
        first = next(iter(presets))
        params.append(
            inspect.Parameter("preset", kw, default=first, annotation=Annotated[
                str, typer.Option(help=f"Named starting point: {', '.join(presets)}.")])
        )  # fmt: skip

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        values: dict[str, Any] = {}
        if presets:
            name = kwargs.pop("preset")
            if name not in presets:
                raise GlassboxError(f"--preset {name!r}: use one of {', '.join(presets)}.")
            values |= presets[name]
        config_file, show = kwargs.pop("config"), kwargs.pop("print_config")
        explicit: set[str] = set()
        if config_file:
            for key, value in load_config_file(config_file, cls).items():
                try:  # YAML reads 3e-3 as text: the flags' converters apply
                    values[key] = by_name[key].convert(value) if value is not None else None
                except (ValueError, typer.BadParameter) as e:
                    raise GlassboxError(f"--config {config_file}: {key}={value!r}: {e}") from e
                explicit.add(key)
        for key, value in kwargs.items():
            if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
                values[key] = value
                explicit.add(key)
        try:
            cfg = cls(**values)
        except TypeError as e:
            raise GlassboxError(f"Invalid settings: {e}") from e
        if show:
            typer.echo(print_config(cfg), nl=False)
            return
        run(cfg, explicit)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    return command
