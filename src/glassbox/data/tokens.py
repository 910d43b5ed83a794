"""Tokenize a corpus once into memory-mapped arrays of token ids, cached by content hash.

Each document is written as ``<|endoftext|> doc tokens``, so document boundaries are
visible to the model and to anyone reading the array. Train and validation are split by
document (see :func:`glassbox.data.corpus.split_documents`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glassbox.data.corpus import Document, split_documents
from glassbox.errors import GlassboxError
from glassbox.tokenizer import Tokenizer
from glassbox.track import progress_bar


def cache_root() -> Path:
    return Path(os.environ.get("GLASSBOX_CACHE", Path.home() / ".cache" / "glassbox"))


def content_key(tok: Tokenizer, docs: list[Document], val_fraction: float) -> str:
    h = hashlib.sha256()
    h.update(tok.to_json().encode())
    h.update(f"val={val_fraction}".encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:24]


def _tokenize(tok: Tokenizer, docs: list[Document], dtype, label: str) -> np.ndarray:
    chunks: list[np.ndarray] = []
    total = sum(len(d.text) for d in docs)
    with progress_bar() as bar:
        task = bar.add_task(f"tokenize {label}", total=total, info="")
        for i in range(0, len(docs), 64):
            batch = docs[i : i + 64]
            for ids in tok.encode_batch([d.text for d in batch]):
                chunks.append(np.asarray([tok.eot_id, *ids], dtype=dtype))
            bar.update(task, advance=sum(len(d.text) for d in batch), info=f"{len(docs)} docs")
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


@dataclass
class TokenData:
    """Train and validation token arrays (memory-mapped) plus what they came from."""

    train: np.ndarray
    val: np.ndarray
    meta: dict

    def get_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows from the training tokens: inputs (B, T) and targets (B, T)."""
        hi = len(self.train) - seq_len - 1
        starts = torch.randint(0, hi + 1, (batch_size,), generator=generator)
        rows = [torch.from_numpy(self.train[s : s + seq_len + 1].astype(np.int64)) for s in starts]
        xy = torch.stack(rows)  # (B, T+1)
        return xy[:, :-1], xy[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None):
        """Consecutive non-overlapping validation windows, (B, T) inputs and targets."""
        data = self.val
        n = (len(data) - 1) // seq_len
        if max_tokens is not None:
            n = min(n, max(1, max_tokens // seq_len))
        for i in range(0, n, batch_size):
            idx = range(i, min(n, i + batch_size))
            xy = torch.stack(
                [
                    torch.from_numpy(data[j * seq_len : j * seq_len + seq_len + 1].astype(np.int64))
                    for j in idx
                ]
            )
            yield xy[:, :-1], xy[:, 1:]


def tokenize_corpus(
    tok: Tokenizer,
    docs: list[Document],
    val_fraction: float = 0.05,
    seq_len: int = 64,
    cache_dir: Path | None = None,
) -> TokenData:
    """Tokenize ``docs`` (train/val split by document), reusing the on-disk cache.

    A cache entry is written whole (files fsynced, then the directory renamed into
    place); one whose files do not match its meta.json (a crash, a full disk) is
    rebuilt rather than failing every later run.
    """
    key = content_key(tok, docs, val_fraction)
    root = (cache_dir or cache_root()) / "tokens"
    final = root / key
    meta = _read_cache(final)
    if meta is None:
        shutil.rmtree(final, ignore_errors=True)  # damaged: rebuild
        _write_cache(tok, docs, val_fraction, root, final)
        meta = _read_cache(final)
        if meta is None:
            raise GlassboxError(f"The token cache {final} could not be written; check the disk.")
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(final / "train.bin", dtype=dtype, mode="r", shape=(meta["train_tokens"],))
    val = np.memmap(final / "val.bin", dtype=dtype, mode="r", shape=(meta["val_tokens"],))
    for name, arr in (("training", train), ("validation", val)):
        if len(arr) < seq_len + 1:
            raise GlassboxError(
                f"The {name} split has {len(arr)} tokens, fewer than one sequence of "
                f"{seq_len + 1}. Add more text, lower --context-length, or change "
                "--val-fraction."
            )
    return TokenData(train, val, meta)


def _read_cache(final: Path) -> dict | None:
    """The entry's metadata when every file is there with the size it promises."""
    try:
        meta = json.loads((final / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {"train.bin": meta["train_tokens"], "val.bin": meta["val_tokens"]}
        for name, count in sizes.items():
            if (final / name).stat().st_size != count * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _write_cache(tok, docs, val_fraction: float, root: Path, final: Path) -> None:
    train_docs, val_docs = split_documents(docs, val_fraction)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    arrays = {
        "train.bin": _tokenize(tok, train_docs, dtype, "train"),
        "val.bin": _tokenize(tok, val_docs, dtype, "val"),
    }
    meta = {
        "dtype": np.dtype(dtype).name,
        "train_tokens": int(len(arrays["train.bin"])),
        "val_tokens": int(len(arrays["val.bin"])),
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "vocab_size": tok.vocab_size,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    files = {name: arr.tobytes() for name, arr in arrays.items()}
    files["meta.json"] = json.dumps(meta, indent=2).encode()
    for name, data in files.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
