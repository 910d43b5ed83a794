"""Corpora: the embedded default (Python's own sources and docs) and user data.

A corpus is a list of documents (strings). Specs accepted by ``--data``:

    builtin:stdlib    the standard library's .py sources and pydoc_data reference docs
    builtin:python    only the .py sources (code, comments, docstrings)
    builtin:pydoc     only the reference documentation (English prose)
    builtin:world     articles about a generated fictional world (glassbox.data.world),
                      its "seen" part; builtin:world-news: its events after the cutoff
    path/to/file.txt  one document per file
    path/to/dir       every text file under the directory (recursively)
    'glob/**/*.md'    files matching a glob pattern
    data.jsonl        one document per line, from a text field (``--text-field``)
"""

from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from glassbox.errors import GlassboxError

BUILTINS = (
    "builtin:stdlib", "builtin:python", "builtin:pydoc", "builtin:world", "builtin:world-news"
)  # fmt: skip
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".html", ".csv", ".tex", ""}
# Skipped from the stdlib: the huge regression-test suites and vendored tools.
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}


@dataclass
class Document:
    name: str
    text: str


def python_sources() -> list[Document]:
    """The standard library's own .py files (about 600 files, 11 MB on CPython 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts):
            continue
        try:
            docs.append(Document(f"stdlib/{rel}", path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def pydoc_topics() -> list[Document]:
    """Python's reference documentation as shipped in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc/{k}", v) for k, v in sorted(topics.items())]


def _read_file(path: Path, text_field: str) -> list[Document]:
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GlassboxError(f"{path}:{n} is not valid JSON ({e.msg}).") from e
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise GlassboxError(
                    f"{path}:{n} has no string field {text_field!r}; pass --text-field "
                    "with the name of the field that holds the text."
                )
            docs.append(Document(f"{path}:{n}", row[text_field]))
        return docs
    try:
        return [Document(str(path), path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError as e:
        raise GlassboxError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    except OSError as e:
        raise GlassboxError(f"Cannot read {path}: {e.strerror}.") from e


def load_corpus(specs: str | list[str], text_field: str = "text") -> list[Document]:
    """Documents for one or more ``--data`` specs; empty or missing data is an error."""
    if isinstance(specs, str):
        specs = [specs]
    docs: list[Document] = []
    for spec in specs:
        if spec == "builtin:stdlib":
            found = python_sources() + pydoc_topics()
        elif spec == "builtin:python":
            found = python_sources()
        elif spec == "builtin:pydoc":
            found = pydoc_topics()
        elif spec in ("builtin:world", "builtin:world-news"):
            from glassbox.data.world import builtin_world

            found = builtin_world().documents("news" if spec.endswith("news") else "seen")
        elif spec.startswith("builtin:"):
            raise GlassboxError(f"Unknown built-in corpus {spec!r}; choose one of {BUILTINS}.")
        else:
            found = []
            path = Path(spec)
            if path.is_file():
                found = _read_file(path, text_field)
            elif path.is_dir():
                files = [p for p in sorted(path.rglob("*")) if p.is_file()]
                files = [p for p in files if p.suffix in TEXT_SUFFIXES]
                for p in files:
                    found += _read_file(p, text_field)
            elif any(c in spec for c in "*?["):
                for name in sorted(glob.glob(spec, recursive=True)):
                    if Path(name).is_file():
                        found += _read_file(Path(name), text_field)
                if not found:
                    raise GlassboxError(f"The pattern {spec!r} matches no readable files.")
            else:
                raise GlassboxError(
                    f"Data path {spec!r} does not exist. Pass a file, a directory, a glob "
                    f"pattern, a .jsonl file, or one of {', '.join(BUILTINS)}."
                )
        docs += found
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise GlassboxError(
            f"The corpus {specs} is empty: no document has any text. Point --data at "
            "files with text in them."
        )
    return docs


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split train/validation by document (every k-th document goes to validation).

    A corpus of fewer than 10 documents is split by position instead: the last
    ``val_fraction`` of each document's characters becomes validation text.
    """
    if not 0.0 < val_fraction < 1.0:
        raise GlassboxError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05).")
    if len(docs) < 10:
        train, val = [], []
        for d in docs:
            cut = int(len(d.text) * (1 - val_fraction))
            train.append(Document(d.name, d.text[:cut]))
            val.append(Document(d.name + "#val", d.text[cut:]))
        return train, val
    every = max(2, round(1 / val_fraction))
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, val
