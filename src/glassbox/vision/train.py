"""Training recipes of the multimodal models: `glassbox clip train` and `glassbox vlm train`.

Both use the shared training layer (:mod:`glassbox.train.finetune`): the run directory,
exact ``--resume`` from atomic safetensors snapshots, metrics.jsonl, loss.png and the
progress bar come from ``Run`` and ``train_loop``; each step here is the recipe's own.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch

from glassbox import checkpoint as ckpt
from glassbox.errors import GlassboxError
from glassbox.train import distributed as dist_
from glassbox.train.finetune import FinetuneConfig, restore_stage, train_loop
from glassbox.train.optim import build_optimizers
from glassbox.train.run import BUDGET_FIELDS, Run
from glassbox.vision.clip import (
    ClipConfig,
    ClipModel,
    batch_captions,
    builtin_vocabulary,
    clip_record,
    info_nce,
    zero_shot,
)
from glassbox.vision.scenes import SceneSet, load_scenes
from glassbox.vision.vlm import FEATURES


@dataclass
class ClipTrainConfig:
    """A contrastive image-text run (CLIP) on scenes or a captioned image folder."""

    out: str = "runs/clip"
    """Run directory to write (must be empty or new unless --resume)."""
    data: str = "builtin:scenes"
    """builtin:scenes, or a folder of images with captions.jsonl ({"file", "caption"})."""
    num_images: int = 20000
    """Training scenes rendered for builtin:scenes (held out: a tenth as many)."""
    patch: int = 8
    """ViT patch size in pixels (48x48 images: 8 gives 6x6 = 36 patches)."""
    stem: str = "conv"
    """ViT patch embedding: conv (a small convolutional stem, then patches) or patch."""
    pool: str = "cls"
    """The image's vector: cls (the [CLS] token's state) or mean (of every token's)."""
    vision_dim: int = 64
    """ViT width."""
    vision_layers: int = 3
    """ViT blocks."""
    text_dim: int = 64
    """Text transformer width."""
    text_layers: int = 2
    """Text transformer blocks."""
    embed_dim: int = 64
    """Size of the shared space."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.05
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    batch_size: int = 128
    """Image-caption pairs per step (each caption's negatives are the batch's others)."""
    max_steps: int = 1000
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    max_minutes: float | None = None
    """Training-time budget in minutes (evaluation and checkpoints excluded)."""
    log_interval: int = 10
    """Steps between metrics rows."""
    eval_interval: int = 250
    """Steps between held-out evaluations (and at the end)."""
    checkpoint_interval: int = 500
    """Steps between snapshots (and at the end)."""
    keep_last: int = 2
    """Snapshots kept in checkpoints/."""
    seed: int = 1337
    """Seed for weights and batches."""
    device: str = "auto"
    """auto, cpu, cuda ..."""
    resume: bool = False
    """Continue the run in --out from its newest snapshot."""

    def validate(self) -> None:
        positive = ["batch_size", "max_steps", "log_interval", "eval_interval", "num_images"]
        positive += ["checkpoint_interval", "keep_last", "vision_layers", "text_layers"]
        for name in positive:
            if getattr(self, name) < 1:
                raise GlassboxError(
                    f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1."
                )
        if not 0 < self.lr < 1:
            raise GlassboxError(f"--lr={self.lr} is out of range; use a value in (0, 1).")
        if self.batch_size < 2:
            raise GlassboxError("--batch-size must be >= 2: a contrastive batch needs negatives.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise GlassboxError(f"--max-minutes={self.max_minutes} must be > 0.")


def open_run(cfg, stage: str, explicit: set[str] | None) -> tuple[Run, torch.device]:
    """Validate, open the run directory (fresh or --resume) and pick the device."""
    cfg.validate()
    d, device = dist_.setup_distributed(cfg.device)
    if d.world > 1:
        raise GlassboxError(
            f"`glassbox {stage} train` runs in one process; launch it without torchrun."
        )
    run = Run.open(cfg, stage, d, explicit, BUDGET_FIELDS)
    torch.manual_seed(run.cfg.seed)
    return run, device


def _step_rng(seed: int, step: int) -> random.Random:
    """The batch randomness of one step: a function of (seed, step), so --resume is exact."""
    return random.Random(seed * 1_000_003 + step)


def train_clip(cfg: ClipTrainConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train a contrastive model; returns the last metrics row (zero-shot accuracy)."""
    run, device = open_run(cfg, "clip", explicit)
    cfg = run.cfg
    train, held = (
        load_scenes(cfg.data, "train", cfg.num_images),
        load_scenes(cfg.data, "heldout", cfg.num_images),
    )
    if train.scenes is None and train.captions is None:
        raise GlassboxError(f"{cfg.data} has no captions.jsonl: a contrastive run needs captions.")
    vocab = builtin_vocabulary() if train.scenes is not None else _folder_vocabulary(train)
    mcfg = ClipConfig(
        patch=cfg.patch, stem=cfg.stem, pool=cfg.pool, vision_dim=cfg.vision_dim,
        vision_layers=cfg.vision_layers,
        text_dim=cfg.text_dim, text_layers=cfg.text_layers, embed_dim=cfg.embed_dim,
        vocab=tuple(vocab),
    )  # fmt: skip
    with torch.device(device):
        model = ClipModel(mcfg).train()
    optimizers = build_optimizers(model, "adamw", cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = restore_stage(run, model, optimizers, gen)[0] if run.snapshot is not None else 0

    def one_step(step: int) -> dict[str, float]:
        rng = _step_rng(cfg.seed, step)
        idx = rng.sample(range(len(train)), min(cfg.batch_size, len(train)))
        texts, pos = batch_captions(train, idx, rng)
        x = train.floats(torch.tensor(idx)).to(device)
        u, v = model.encode_image(x), model.encode_text(texts)
        loss = info_nce(u, v, model.scale(), pos.to(device))
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"train_loss": loss.item(), "logit_scale": model.scale().item()}

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            rng = random.Random(0)
            idx = list(range(min(len(held), 256)))
            texts, pos = batch_captions(held, idx, rng)
            u = model.encode_image(held.floats(torch.tensor(idx)).to(device))
            row = {
                "val_loss": info_nce(
                    u, model.encode_text(texts), model.scale(), pos.to(device)
                ).item()
            }
            if held.scenes is not None:
                zs = zero_shot(model, held)
                row |= {f"zero_shot_{a}": zs[a] for a in ("shape", "colour", "size", "position")}
        model.train()
        return row

    def save(step: int) -> None:
        record = clip_record(mcfg, {"data": cfg.data, "train": dataclasses.asdict(cfg)})
        files = {
            "model.safetensors": ckpt.tensors_bytes(model.state_dict(), {"format": "pt"}),
            "config.json": ckpt.json_bytes(record),
        }
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        metas = []
        for i, opt in enumerate(optimizers):
            tensors[f"optimizer{i}"], meta = ckpt.optimizer_state_to_tensors(opt.state_dict())
            metas.append(meta)
        tensors["rng"] = {"data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()}
        run.save(step, files, tensors, {"optimizers": metas})

    return train_loop(run, step, optimizers, one_step, save, evaluate, title="contrastive (CLIP)")


def _folder_vocabulary(data: SceneSet) -> list[str]:
    from glassbox.diffusion.text import Vocabulary

    return Vocabulary.build(data.captions or []).tokens


# ---------------------------------------------------------------------------------------
# The vision-language model
# ---------------------------------------------------------------------------------------


@dataclass
class VLMTrainConfig(FinetuneConfig):
    """A vision-language run: a chat model (--base) reads images through the ViT of a
    contrastive run (--vision) and a new projector; captioning and QA, loss on answers."""

    out: str = "runs/vlm"
    """Run directory to write (must be empty or new unless --resume)."""
    vision: str | None = None
    """The `glassbox clip train` run whose image encoder is used."""
    data: str = "builtin:scenes"
    """builtin:scenes, or a folder of images with qa.jsonl ({"file", "question", "answer"})."""
    num_images: int = 20000
    """Training scenes rendered for builtin:scenes (held out: a tenth as many)."""
    freeze_vision: bool = True
    """Keep the image encoder's weights fixed (train the projector and the LM only), as
    LLaVA's first stage does: tuned at this learning rate from a random projector, the
    ViT loses the shape features contrastive training gave it (docs/multimodal.md)."""
    vision_lr_ratio: float = 0.1
    """With --no-freeze-vision, the ViT learns at lr * this (on the same schedule): small,
    so a random projector's first gradients do not erase what contrastive training gave
    the encoder."""
    pool: int = 2
    """Image patches average-pooled pool x pool into one image token (1 = every patch)."""
    cls_token: bool = False
    """The ViT's [CLS] state as the first image token (a summary of the whole image). Off
    by default: with it the language model answers from that bag of attributes and, on
    scenes of 2-4 objects, mixes up which colour goes with which shape; without it, it
    must read the cells, slower at first and far better after ~2500 steps
    (docs/multimodal.md, "Results")."""
    positions: bool = False
    """Add a learned row and column vector to each image token (and one to [CLS]), so
    the language model can find a cell by its place: rotary positions only say how far
    back a token is, which changes with the question's length."""
    features: str = "stem+last"
    """Image tokens from the ViT's last block (last), its stem (stem) or both (stem+last)."""
    loss_average: str = "example"
    """token: the mean over every answer token of the batch (a caption of 40 tokens
    outweighs forty one-word answers); example: each answer's mean, then the mean over
    answers (every question weighs the same)."""
    single_object_fraction: float | None = None
    """Share of training questions about single-object scenes (builtin:scenes; default:
    as rendered, 40%). They are answered right early; questions about 2-4 objects need
    the model to bind each colour to its shape and place, and are the slow part."""
    question_first_fraction: float = 0.0
    """Share of examples that ask the question before the image (the rest: image first)."""
    no_image_fraction: float = 0.1
    """Share of examples asked without their image (the no-image baseline's training)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    batch_size: int = 32
    """Questions per micro-batch."""
    max_steps: int = 6000
    """Optimizer steps; the schedule follows this or --max-minutes, whichever ends first."""
    max_minutes: float | None = 10.0
    """Training-time budget in minutes (evaluation and checkpoints excluded); on a quiet
    2-core CPU 10 minutes are about 4600 steps."""
    eval_interval: int = 200
    """Steps between held-out evaluations (and at the end)."""
    checkpoint_interval: int = 200
    """Steps between snapshots (and at the end)."""
    eval_limit: int = 50
    """Held-out questions per type in each evaluation."""

    def validate(self) -> None:
        super().validate()
        if not self.vision:
            raise GlassboxError(
                "No image encoder: pass --vision RUN, a `glassbox clip train` output."
            )
        if self.single_object_fraction is not None and not 0 <= self.single_object_fraction <= 1:
            raise GlassboxError(
                f"--single-object-fraction={self.single_object_fraction} must be in [0, 1]."
            )
        if not 0 < self.vision_lr_ratio <= 1:
            raise GlassboxError(f"--vision-lr-ratio={self.vision_lr_ratio} must be in (0, 1].")
        if self.loss_average not in ("token", "example"):
            raise GlassboxError(f"--loss-average={self.loss_average!r}: use token or example.")
        if self.features not in FEATURES:
            raise GlassboxError(f"--features={self.features!r}: use one of {', '.join(FEATURES)}.")
        if not 0 <= self.question_first_fraction <= 1:
            raise GlassboxError(
                f"--question-first-fraction={self.question_first_fraction} must be in [0, 1]."
            )
        if not 0 <= self.no_image_fraction < 1:
            raise GlassboxError(f"--no-image-fraction={self.no_image_fraction} must be in [0, 1).")


def load_vision(path: str, device: torch.device):
    """The ViT (and its config) of a contrastive run."""
    loaded = ckpt.load_checkpoint(path, device)
    if loaded.architecture != "clip":
        raise GlassboxError(
            f"--vision {path} holds a {loaded.architecture!r} checkpoint; pass the output of "
            "`glassbox clip train`."
        )
    return loaded.model.vision, loaded.model.config


def vlm_batch(
    tok,
    data: SceneSet,
    idx: list[int],
    rng: random.Random,
    model,
    p_no_image: float,
    p_question_first: float = 0.0,
):
    """Right-padded ids (B, T), targets (B, T) (-100 outside answers), images, slots."""
    from glassbox.vision.vlm import training_example

    rows, masks, slot_rows, pix = [], [], [], []
    for b, i in enumerate(idx):
        q = rng.choice(data.qa[i])
        has_image = rng.random() >= p_no_image
        image_first = not (p_question_first and rng.random() < p_question_first)
        ids, mask, starts = training_example(tok, q.question, q.answer, has_image,
                                             model.image_tokens, image_first)  # fmt: skip
        rows.append(ids)
        masks.append(mask)
        if has_image:
            slot_rows.append((b, starts[0]))
            pix.append(i)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[b, : len(r)] = torch.tensor(r)
        keep = torch.tensor(m[1:], dtype=torch.bool)  # target t+1 learned where mask[t+1]
        targets[b, : len(r) - 1] = torch.where(keep, torch.tensor(r[1:]), -100)
    images = data.floats(torch.tensor(pix, dtype=torch.long)) if pix else None
    slots = torch.tensor(slot_rows, dtype=torch.long) if slot_rows else None
    return ids, targets, images, slots


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, average: str) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T) (-100: not learned),
    averaged over tokens (``token``) or per answer, then over answers (``example``)."""
    import torch.nn.functional as F

    per = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    if average == "token":
        return per.sum() / (targets != -100).sum().clamp(min=1)
    n = (targets != -100).sum(1)  # (B,)
    return (per.sum(1)[n > 0] / n[n > 0]).mean()


def scene_sampler(data: SceneSet, single_fraction: float | None):
    """rng -> a training image index: uniform, or (built-in scenes with
    ``single_fraction`` set) a single-object scene with that probability, else a scene of
    2-4 objects."""
    if single_fraction is None or data.scenes is None:
        return lambda rng: rng.randrange(len(data))
    single = [i for i, s in enumerate(data.scenes) if len(s.objects) == 1]
    multi = [i for i, s in enumerate(data.scenes) if len(s.objects) > 1]
    if not single or not multi:
        return lambda rng: rng.randrange(len(data))
    return lambda rng: rng.choice(single if rng.random() < single_fraction else multi)


def train_vlm(cfg: VLMTrainConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Train a vision-language model; returns the last metrics row (QA accuracy)."""
    from glassbox.train.finetune import load_start, open_stage, save_stage
    from glassbox.vision.vlm import (
        VisionLanguageModel,
        evaluate_qa,
        load_vlm_state,
        vlm_record,
        vlm_state,
    )

    run, device = open_stage(cfg, "vlm", explicit)
    cfg = run.cfg
    lm, tok, _ = load_start(cfg.base, device)
    vision, vision_cfg = load_vision(cfg.vision, device)
    train = load_scenes(cfg.data, "train", cfg.num_images)
    held = load_scenes(cfg.data, "heldout", cfg.num_images)
    if not any(train.qa):
        raise GlassboxError(f"{cfg.data} has no questions: add a qa.jsonl to the folder.")
    model = VisionLanguageModel(lm, vision_cfg, cfg.pool, cfg.features, cfg.cls_token,
                                cfg.positions)  # fmt: skip
    model = model.to(device)
    model.vision.load_state_dict(vision.state_dict())
    model.train()
    adamw = ("adamw", cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    model.vision.requires_grad_(False)
    optimizers = build_optimizers(model, *adamw)  # everything but the ViT
    if not cfg.freeze_vision:  # its own optimizer, stepped at lr * vision_lr_ratio
        model.vision.requires_grad_(True)
        optimizers += build_optimizers(model.vision, *adamw)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if run.snapshot is not None:
        load_vlm_state(model, run.snapshot.tensors["model.safetensors"], run.snapshot.path)
        step = restore_stage(run, None, optimizers, gen)[0]

    draw = scene_sampler(train, cfg.single_object_fraction)

    def one_step(step: int) -> dict[str, float]:
        rng = _step_rng(cfg.seed, step)
        total, tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            idx = [draw(rng) for _ in range(cfg.batch_size)]
            ids, targets, images, slots = vlm_batch(tok, train, idx, rng, model,
                cfg.no_image_fraction, cfg.question_first_fraction)  # fmt: skip
            logits = model(ids.to(device), None if images is None else images.to(device),
                           None if slots is None else slots.to(device))  # fmt: skip
            loss = answer_loss(logits, targets.to(device), cfg.loss_average)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens += int(ids.numel())
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not cfg.freeze_vision:  # the loop set every group to the scheduled lr
            for group in optimizers[-1].param_groups:
                group["lr"] *= cfg.vision_lr_ratio
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"train_loss": total, "tokens": tokens}

    def evaluate() -> dict[str, float]:
        acc = evaluate_qa(model, tok, held, cfg.eval_limit)
        return {f"qa_{k}": v for k, v in acc.items()}

    def save(step: int) -> None:
        record = vlm_record(model, {"vision": cfg.vision, "data": cfg.data})
        save_stage(run, step, model.lm, tok, optimizers, gen, weights=vlm_state(model),
                   record=record)  # fmt: skip

    return train_loop(
        run, step, optimizers, one_step, save, evaluate, title="vision-language model"
    )
