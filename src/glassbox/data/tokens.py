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
    """Tokenize ``docs`` (train/val split by document), reusing the on-disk cache."""
    key = content_key(tok, docs, val_fraction)
    root = (cache_dir or cache_root()) / "tokens"
    final = root / key
    if not (final / "meta.json").is_file():
        train_docs, val_docs = split_documents(docs, val_fraction)
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        train = _tokenize(tok, train_docs, dtype, "train")
        val = _tokenize(tok, val_docs, dtype, "val")
        meta = {
            "dtype": np.dtype(dtype).name,
            "train_tokens": int(len(train)),
            "val_tokens": int(len(val)),
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "val_bytes": sum(len(d.text.encode("utf-8", "surrogatepass")) for d in val_docs),
            "vocab_size": tok.vocab_size,
        }
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "meta.json").read_text())
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
