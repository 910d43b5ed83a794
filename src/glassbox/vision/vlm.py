"""A vision-language model: the contrastive run's image encoder, a projector, and a
chat language model that reads the image as tokens (LLaVA / nanoVLM layout).

    image (3, 48, 48) -> ViT (from `glassbox clip train`) -> [CLS] + 6x6 patch states
        -> patches average-pooled 2x2 -> [CLS] + 3x3 cells
        -> projector MLP (vision_dim -> d_model -> d_model) -> 10 image vectors
    "<image>\\nHow many red shapes are there?" -> chat template -> token ids
        -> the ids of the marker text "<image>" are replaced by 10 slots, and the
           language model's input vectors at those slots are the image vectors
        -> Transformer (embeds=...) -> next-token logits -> the answer

**The placeholder.** No special token is added to any tokenizer (every chat checkpoint
can become a VLM): the marker is the plain text ``<image>`` (:data:`IMAGE_MARKER`)
written where an image content part was, on a line of its own, which every byte-level
BPE here splits the same way in context. :func:`splice_ids` finds those ids and
replaces them with ``image_tokens`` slots; a marker that does not tokenize in place is
an error rather than a silent text-only prompt.

**Training** (:mod:`glassbox.vision.train`) is captioning and QA with the loss on the
answer tokens only (the chat loss mask; image slots and the question are never
targets). A tenth of the examples drop the image (no marker at all), so the same model
answers without looking: the **no-image baseline** is that model with the image
removed, its language prior.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.checkpoint import Loaded, load_tensors, register_loader
from glassbox.conversation import encode_conversation, encode_prompt
from glassbox.errors import GlassboxError
from glassbox.model import KVCache, Transformer, read_config_and_tokenizer
from glassbox.vision.clip import ClipConfig, ViT, clip_config_from_record

IMAGE_MARKER = "<image>"


FEATURES = ("last", "stem", "stem+last")
"""Which ViT states become image tokens: the last block's (``last``), the stem's (the
blocks' input, ``stem``: each patch vector sees only its own pixels), or both
concatenated per token (``stem+last``). See :meth:`VisionLanguageModel.encode_images`."""


class VisionLanguageModel(nn.Module):
    """``vision`` (a ViT) -> ``projector`` -> image vectors spliced into ``lm``'s input."""

    def __init__(
        self,
        lm: Transformer,
        vision_cfg: ClipConfig,
        pool: int = 2,
        features: str = "last",
        cls_token: bool = True,
        positions: bool = False,
    ):
        super().__init__()
        if vision_cfg.grid % pool:
            raise GlassboxError(
                f"--pool {pool} must divide the ViT's {vision_cfg.grid}x{vision_cfg.grid} grid."
            )
        if features not in FEATURES:
            raise GlassboxError(f"--features {features!r}: use one of {', '.join(FEATURES)}.")
        self.lm = lm
        self.vision_cfg = vision_cfg
        self.pool = pool
        self.features = features
        self.cls_token = cls_token
        self.positions = positions
        self.vision = ViT(vision_cfg)
        d, dv = lm.cfg.d_model, vision_cfg.vision_dim * (2 if features == "stem+last" else 1)
        self.projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        if positions:  # learned row and column vectors added to each cell's, one for [CLS]
            side = vision_cfg.grid // pool
            self.image_rows = nn.Parameter(torch.randn(side, d) * 0.1)
            self.image_cols = nn.Parameter(torch.randn(side, d) * 0.1)
            self.image_cls = nn.Parameter(torch.randn(d) * 0.1)

    @property
    def image_tokens(self) -> int:
        """Vectors per image: [CLS] (if ``cls_token``) plus one per pooled cell of patches."""
        return int(self.cls_token) + (self.vision_cfg.grid // self.pool) ** 2

    def _cells(self, h: torch.Tensor) -> torch.Tensor:
        """Patch states (B, g*g, dv) average-pooled ``pool`` x ``pool``: (B, (g/p)^2, dv)."""
        B, g = h.shape[0], self.vision_cfg.grid
        grid = h.transpose(1, 2).reshape(B, -1, g, g)  # (B, dv, g, g)
        return F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, image_tokens, d_model): [CLS], then the patch
        states average-pooled ``pool`` x ``pool`` (6x6 patches -> 3x3 cells: on scenes,
        one cell per grid cell of the layout), row-major, through the projector.

        ``features`` picks the patch states: ``last`` (the ViT's output), ``stem`` (the
        blocks' input, layer-normalized) or ``stem+last`` (both, concatenated). The
        [CLS] token is always the last block's (the stem's is the same for every image).
        Why: the ViT was trained on its [CLS] vector only, and its blocks mix the patch
        states; a linear probe of a cell's object from the pooled states reads colour
        and shape from the stem at 1.00 but from the last block at 0.86 / 0.92
        (docs/multimodal.md)."""
        h0 = self.vision.embed(x)  # (B, 1 + g*g, dv)
        h = self.vision.norm(self.vision.blocks(h0))  # (B, 1 + g*g, dv)
        cls, cells = h[:, :1], self._cells(h[:, 1:])
        if self.features != "last":
            stem = self._cells(h0[:, 1:])
            stem = F.layer_norm(stem, stem.shape[-1:])
            both = self.features == "stem+last"
            cls = torch.cat([cls, cls], -1) if both else cls
            cells = torch.cat([stem, cells], -1) if both else stem
        out = self.projector(torch.cat([cls, cells], dim=1) if self.cls_token else cells)
        if self.positions:  # (side*side, d): row r, column c at r * side + c
            grid = (self.image_rows[:, None] + self.image_cols[None, :]).flatten(0, 1)
            pos = torch.cat([self.image_cls[None], grid]) if self.cls_token else grid
            out = out + pos
        return out

    def input_embeds(
        self,
        ids: torch.Tensor,  # (B, T)
        images: torch.Tensor | None = None,  # (M, 3, H, W), M = number of image slots / N
        slots: torch.Tensor | None = None,  # (M, 2): (row, first position) of each image
    ) -> torch.Tensor:
        """Token embeddings with each image's vectors written at its slots (B, T, C)."""
        x = self.lm.embed(ids)
        if images is None or images.shape[0] == 0:
            return x
        img = self.encode_images(images).to(x.dtype)  # (M, N, C)
        N = img.shape[1]
        rows = slots[:, :1].expand(-1, N)  # (M, N)
        cols = slots[:, 1:] + torch.arange(N, device=ids.device)  # (M, N)
        return x.index_put((rows, cols), img)

    def forward(self, ids, images=None, slots=None, **kw) -> torch.Tensor:
        """Logits (B, T, V); ``kw`` go to the language model (cache, input_pos ...)."""
        return self.lm(ids, embeds=self.input_embeds(ids, images, slots), **kw)


# ---------------------------------------------------------------------------------------
# Prompts with images
# ---------------------------------------------------------------------------------------


def splice_ids(
    tok, ids: list[int], n_images: int, image_tokens: int
) -> tuple[list[int], list[int]]:
    """Replace each ``<image>`` marker's ids with ``image_tokens`` slots (filled with the
    pad id; their vectors come from the image). Returns (ids, first slot position of
    each image). Exactly ``n_images`` markers must be found."""
    marker = tok.encode(IMAGE_MARKER)
    out: list[int] = []
    starts: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i : i + len(marker)] == marker:
            starts.append(len(out))
            out += [tok.pad_id] * image_tokens
            i += len(marker)
        else:
            out.append(ids[i])
            i += 1
    if len(starts) != n_images:
        raise GlassboxError(
            f"The prompt has {len(starts)} image placeholders in the token ids but "
            f"{n_images} images; write {IMAGE_MARKER!r} on its own line once per image "
            "(an image content part does this)."
        )
    return out, starts


def image_messages(
    question: str, has_image: bool, answer: str | None = None, image_first: bool = True
) -> list[dict]:
    """A one-turn chat: the image marker on its own line (if any), then the question
    (or the question, then the marker, with ``image_first=False``)."""
    content = question
    if has_image:
        content = f"{IMAGE_MARKER}\n{question}" if image_first else f"{question}\n{IMAGE_MARKER}"
    msgs = [{"role": "user", "content": content}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def training_example(
    tok, question: str, answer: str, has_image: bool, image_tokens: int, image_first: bool = True
) -> tuple[list[int], list[int], list[int]]:
    """(ids, loss mask, image starts) of one question/answer; loss on the answer only."""
    chat = encode_conversation(tok, image_messages(question, has_image, answer, image_first))
    ids, starts = splice_ids(tok, chat.ids, int(has_image), image_tokens)
    mask = list(chat.loss_mask)
    if has_image:  # the marker's ids became image_tokens slots (none of them learned)
        s, n_marker = starts[0], len(tok.encode(IMAGE_MARKER))
        mask = mask[:s] + [0] * image_tokens + mask[s + n_marker :]
    return ids, mask, starts


def prompt_ids(tok, messages: list[dict], n_images: int, image_tokens: int):
    """Generation prompt ids (text messages with markers) and the image starts."""
    return splice_ids(tok, encode_prompt(tok, messages), n_images, image_tokens)


def flatten_content_parts(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """OpenAI content parts -> plain-text messages with ``<image>`` markers, and the
    ``image_url`` objects in order. Text-only messages pass through unchanged."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                images.append((f"messages[{i}].content[{k}].image_url", part.get("image_url")))
                texts.append(IMAGE_MARKER + "\n")
            else:
                raise GlassboxError(
                    f"messages[{i}].content[{k}].type={kind!r}: use 'text' or 'image_url'."
                )
        out.append({**m, "content": "".join(texts)})
    return out, images


# ---------------------------------------------------------------------------------------
# Generation (batched greedy, or sampled for one prompt) with the model's KV cache
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    tok,
    prompts: list[tuple[list[int], list[int]]],  # per row: (ids, image starts)
    images: list[torch.Tensor | None],  # per row: (k, 3, H, W) uint8 or float, or None
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int | None = None,
    on_first_token=None,
) -> list[list[int]]:
    """Continue each prompt until a stop id or ``max_new_tokens``; returns new ids.

    Rows are right-padded into one prefill (causal attention: padding after a row's end
    changes nothing before it) and then decoded together, each at its own position."""
    lm = model.lm
    device = next(model.parameters()).device
    B = len(prompts)
    lens = [len(p) for p, _ in prompts]
    L = max(lens)
    if L + max_new_tokens > lm.cfg.context_length:
        raise GlassboxError(
            f"The prompt ({L} tokens with image slots) plus {max_new_tokens} new tokens "
            f"exceeds the context of {lm.cfg.context_length}."
        )
    ids = torch.full((B, L), tok.pad_id, dtype=torch.long)
    slot_rows, pix = [], []
    for b, ((p, starts), img) in enumerate(zip(prompts, images, strict=True)):
        ids[b, : len(p)] = torch.tensor(p)
        if starts:
            if img is None or img.shape[0] != len(starts):
                raise GlassboxError(f"Row {b} has {len(starts)} image slots but no images.")
            slot_rows += [(b, s) for s in starts]
            pix.append(img)
    images_t = slots = None
    if pix:
        images_t = _as_float(torch.cat(pix)).to(device)
        slots = torch.tensor(slot_rows, device=device)
    ids = ids.to(device)
    cache = KVCache(lm.cfg, B, L + max_new_tokens, device=device, dtype=lm.embed.weight.dtype)
    pos = torch.arange(L, device=device).expand(B, L)
    logits = model(ids, images_t, slots, cache=cache, input_pos=pos)  # (B, L, V)
    last = torch.tensor(lens, device=device) - 1
    nxt_logits = logits[torch.arange(B, device=device), last]  # (B, V)
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    cur = last + 1
    stops = set(tok.stop_ids)
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = F.softmax(nxt_logits.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            nxt = nxt_logits.argmax(-1)
        if step == 0 and on_first_token is not None:
            on_first_token()
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                if t in stops:
                    done[b] = True
                else:
                    out[b].append(t)
        if all(done):
            break
        nxt_logits = lm(nxt[:, None], cache=cache, input_pos=cur[:, None])[:, -1]
        cur = cur + 1
    return out


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def answer(
    model: VisionLanguageModel,
    tok,
    messages: list[dict],
    images: list[torch.Tensor],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    on_first_token=None,
) -> str:
    """The assistant's reply to ``messages`` (with one ``<image>`` marker per image)."""
    ids, starts = prompt_ids(tok, messages, len(images), model.image_tokens)
    img = torch.stack(images) if images else None
    new = generate(model, tok, [(ids, starts)], [img], max_new_tokens, temperature, seed,
                   on_first_token)[0]  # fmt: skip
    return tok.decode(new)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def vlm_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Weights without the tied LM head duplicate."""
    sd = model.state_dict()
    if model.lm.cfg.tie_embeddings:
        sd.pop("lm.lm_head.weight", None)
    return sd


def load_vlm_state(model: VisionLanguageModel, state: dict[str, torch.Tensor], where) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.lm.cfg.tie_embeddings and k == "lm.lm_head.weight")]
    if missing or unexpected:
        raise GlassboxError(
            f"{where} does not match its config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the checkpoint is corrupted or from another model."
        )


def vlm_record(model: VisionLanguageModel, extra: dict | None = None) -> dict:
    from glassbox import __version__

    vis = asdict(model.vision_cfg) | {"vocab": list(model.vision_cfg.vocab)}
    head = {"architecture": "vlm", "stage": "vlm", "glassbox_version": __version__}
    shape = {"model": model.lm.cfg.to_dict(), "clip": vis, "pool": model.pool,
             "features": model.features, "cls_token": model.cls_token,
             "positions": model.positions}  # fmt: skip
    return head | shape | (extra or {})


@register_loader("vlm")
def _load_vlm(path: Path, record: dict, device: torch.device) -> Loaded:
    """A VLM run: config.json (architecture vlm, the LM's and the ViT's shapes),
    model.safetensors (lm.*, vision.*, projector.*) and the LM's tokenizer.json."""
    cfg, tokenizer = read_config_and_tokenizer(path, record)
    vision_cfg = clip_config_from_record(record, path)
    with torch.device(device):
        model = VisionLanguageModel(Transformer(cfg), vision_cfg, int(record.get("pool", 2)),
                                    str(record.get("features", "last")),
                                    bool(record.get("cls_token", True)),
                                    bool(record.get("positions", False)))  # fmt: skip
    state = load_tensors(path / "model.safetensors", device=device)
    load_vlm_state(model, state, path / "model.safetensors")
    return Loaded(model.eval(), tokenizer, record, "vlm")


# ---------------------------------------------------------------------------------------
# Evaluation: QA accuracy per question type, with the image and without
# ---------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate_qa(
    model: VisionLanguageModel,
    tok,
    data,
    limit: int = 100,
    with_image: bool = True,
    batch_size: int = 64,
    kinds: tuple[str, ...] | None = None,
    image_first: bool = True,
) -> dict[str, float]:
    """Exact-match accuracy per question type on up to ``limit`` questions of each
    (greedy answers); ``with_image=False`` asks the same questions without the image,
    ``image_first=False`` asks each question before its image."""
    by_kind: dict[str, list[tuple[int, Any]]] = {}
    for i, qa in enumerate(data.qa):
        for q in qa:
            if (kinds is None or q.kind in kinds) and len(by_kind.get(q.kind, [])) < limit:
                by_kind.setdefault(q.kind, []).append((i, q))
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for kind, items in sorted(by_kind.items()):
        right = 0
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            prompts = [
                prompt_ids(tok, image_messages(q.question, with_image, None, image_first),
                           int(with_image),
                           model.image_tokens)
                for _, q in chunk
            ]  # fmt: skip
            imgs = [data.images[i : i + 1] if with_image else None for i, _ in chunk]
            new = generate(
                model, tok, prompts, imgs, max_new_tokens=96 if kind == "caption" else 24
            )
            right += sum(
                normalize_answer(tok.decode(n)) == normalize_answer(q.answer)
                for n, (_, q) in zip(new, chunk, strict=True)
            )
        out[kind] = right / len(items)
    model.train(was_training)
    return out
