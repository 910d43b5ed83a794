"""A retrieval index over chunks: BM25 (lexical), dense (our own model's mean-pooled
hidden states) and hybrid (reciprocal rank fusion of the two rankings).

BM25 comes from `bm25s` (Lucene's formula); dense vectors from any checkpoint trained
here: the language model's last hidden states averaged over a chunk's tokens and
L2-normalised, so similarity is a dot product. On disk an index is plain files, nothing
pickled: ``index.json`` (settings), ``chunks.jsonl`` (one chunk per line) and
``embeddings.safetensors`` (the dense vectors, when a model was given). BM25 is rebuilt
from the chunks on load; it takes milliseconds per thousand chunks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import bm25s
import numpy as np
import torch

from glassbox.checkpoint import atomic_write_bytes, load_json, load_tensors, save_json, save_tensors
from glassbox.errors import GlassboxError
from glassbox.model import Transformer
from glassbox.rag.chunking import Chunk
from glassbox.tokenizer import Tokenizer

Mode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[Mode, ...] = ("bm25", "dense", "hybrid")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
FORMAT = "glassbox-rag-index/1"


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased words of two or more characters, English stop words removed."""
    return bm25s.tokenize(list(texts), return_ids=False, show_progress=False)


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # bm25 score, cosine similarity, or fused RRF score
    rank: int  # 0-based position in the returned list


class Embedder:
    """Text -> unit vectors from a language model: mean of the last hidden states."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = model.cfg.context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, C) float32 unit vectors, one per text (texts longer than the context keep
        their first ``context_length`` tokens)."""
        eot = self.tokenizer.eot_id
        return self.embed_ids([self.tokenizer.encode(t)[: self.max_tokens] or [eot] for t in texts])

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, C) unit vectors of token-id sequences (each non-empty, within the context):
        the final hidden states averaged over the tokens, L2-normalised."""
        device = self.model.embed.weight.device
        out = []
        for i in range(0, len(ids), self.batch_size):
            batch = ids[i : i + self.batch_size]
            T = max(len(b) for b in batch)
            x = torch.zeros(len(batch), T, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), T, device=device)
            for r, b in enumerate(batch):  # right padding: causal attention never sees it
                x[r, : len(b)] = torch.tensor(list(b), device=device)
                mask[r, : len(b)] = 1
            h = self.model.hidden(x).float()  # (B, T, C)
            mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, C)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.model.cfg.d_model)
        return torch.cat(out)


class Index:
    """Chunks plus their BM25 index and (optionally) dense vectors; see :meth:`search`."""

    def __init__(
        self, chunks: list[Chunk], embeddings: torch.Tensor | None = None, meta: dict | None = None
    ):
        if not chunks:
            raise GlassboxError("The index has no chunks: the documents were empty.")
        if embeddings is not None and embeddings.shape[0] != len(chunks):
            raise GlassboxError(
                f"The index has {len(chunks)} chunks but {embeddings.shape[0]} embeddings; "
                "rebuild it with `glassbox rag index`."
            )
        self.chunks = chunks
        self.embeddings = embeddings  # (N, C) unit rows, or None
        self.meta = dict(meta or {})
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25_tokens([c.text for c in chunks]), show_progress=False)

    def bm25_scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every chunk for ``query``."""
        return self.bm25.get_scores(bm25_tokens([query])[0])

    def dense_scores(self, query: str, embedder: Embedder) -> np.ndarray:
        """(N,) cosine similarity of every chunk with ``query``."""
        if self.embeddings is None:
            raise GlassboxError(
                "This index has no dense vectors; rebuild it with --model RUN, or search "
                "with --mode bm25."
            )
        q = embedder([query])[0]  # (C,)
        if q.shape[0] != self.embeddings.shape[1]:
            raise GlassboxError(
                f"The query model's vectors have {q.shape[0]} dimensions but the index's have "
                f"{self.embeddings.shape[1]}; ask with the model the index was built with "
                f"({self.meta.get('model')})."
            )
        return (self.embeddings @ q).numpy()

    def search(
        self, query: str, k: int = 5, mode: Mode = "hybrid", embedder: Embedder | None = None
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``. ``hybrid`` fuses the BM25 and dense
        rankings by reciprocal rank (score = sum of 1 / (60 + rank)); without dense
        vectors or an embedder it is BM25 alone."""
        if mode not in MODES:
            raise GlassboxError(f"mode={mode!r} is not one of {list(MODES)}.")
        if k < 1:
            raise GlassboxError(f"k={k} must be >= 1.")
        if mode == "hybrid" and (self.embeddings is None or embedder is None):
            mode = "bm25"
        if mode == "dense" and embedder is None:
            raise GlassboxError("Dense search needs the model the index was built with.")
        if mode == "bm25":
            scores = self.bm25_scores(query)
        elif mode == "dense":
            scores = self.dense_scores(query, embedder)  # type: ignore[arg-type]
        else:
            scores = np.zeros(len(self.chunks))
            for s in (self.bm25_scores(query), self.dense_scores(query, embedder)):  # type: ignore[arg-type]
                order = np.argsort(-s, kind="stable")
                scores[order] += 1.0 / (RRF_K + 1 + np.arange(len(order)))
        top = np.argsort(-scores, kind="stable")[:k]
        return [Hit(self.chunks[i], float(scores[i]), r) for r, i in enumerate(top)]

    # -- files ------------------------------------------------------------------------

    def save(self, out: str | Path) -> Path:
        """Write the index directory (atomic per file)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in self.chunks)
        atomic_write_bytes(out / "chunks.jsonl", lines.encode())
        if self.embeddings is not None:
            save_tensors(
                {"embeddings": self.embeddings.contiguous()}, out / "embeddings.safetensors"
            )
        dense = self.embeddings is not None
        head = {"format": FORMAT, "chunks": len(self.chunks), "dense": dense}
        save_json({**head, **self.meta}, out / "index.json")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Index:
        path = Path(path)
        if not (path / "index.json").is_file():
            raise GlassboxError(
                f"{path} is not a retrieval index (no index.json); build one with "
                "`glassbox rag index DOCS --out DIR`."
            )
        meta = load_json(path / "index.json")
        if meta.get("format") != FORMAT:
            raise GlassboxError(
                f"{path}/index.json has format {meta.get('format')!r}, expected {FORMAT!r}."
            )
        chunks = []
        for n, line in enumerate(
            (path / "chunks.jsonl").read_text(encoding="utf-8").splitlines(), 1
        ):
            try:
                chunks.append(Chunk(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise GlassboxError(f"{path}/chunks.jsonl:{n} is not a chunk ({e}).") from e
        emb = None
        if meta.get("dense"):
            emb = load_tensors(path / "embeddings.safetensors")["embeddings"].float()
        meta = {k: v for k, v in meta.items() if k not in ("format", "chunks", "dense")}
        return cls(chunks, emb, meta)


def build_index(
    chunks: list[Chunk], embedder: Embedder | None = None, meta: dict | None = None
) -> Index:
    """Index ``chunks`` for BM25, and for dense search when an embedder is given."""
    emb = embedder([c.text for c in chunks]) if embedder is not None and chunks else None
    return Index(chunks, emb, meta)
