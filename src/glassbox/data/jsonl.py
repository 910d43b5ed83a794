"""JSON Lines files users bring (chats, preference pairs, tasks): read with errors that
name the file, the line and the field, and say how to fix it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError


def read_jsonl(path: str | Path, what: str = "records") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("FILE:LINE", record)`` for every non-blank line of a JSONL file.

    A missing or unreadable file, a line that is not a JSON object and a file with no
    records are errors; ``what`` says what the lines should hold, for the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"{path} does not exist; pass a .jsonl file of {what}.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise GlassboxError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    except OSError as e:
        raise GlassboxError(f"Cannot read {path}: {e.strerror}.") from e
    count = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlassboxError(f"{where} is not valid JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(record, dict):
            raise GlassboxError(f"{where} must be a JSON object of {what}, not {_kind(record)}.")
        count += 1
        yield where, record
    if count == 0:
        raise GlassboxError(f"{path} holds no {what}; write one JSON object per line.")


def field(record: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``record[name]``, which must exist and be of ``kind``; otherwise an error naming
    the place and the field."""
    if name not in record:
        raise GlassboxError(f"{where} has no {name!r} field (it has {sorted(record)}).")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise GlassboxError(f"{where}: field {name!r} must be {names}, not {_kind(value)}.")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
