"""Measured quality: does the image show what was asked, and does it look like the data?

1. A small CNN is trained on the *real* training images to read off what they show
   (shape, colour, size, position for ``builtin:shapes``; the digit for
   ``builtin:digits``; the label for labelled folders). Its held-out accuracy on real
   images is reported as the ceiling.
2. For each (sampler, steps) x guidance cell, the same prompts and the same initial
   noise are used; the classifier scores whether each image shows what its prompt
   requested (accuracy), and the Frechet distance between the classifier's penultimate
   features of the generated images and of held-out real images measures how far the
   generated distribution is from the real one (quality *and* diversity: collapsing
   onto a few prototypes raises it). The row "real" is real training images scored the
   same way, the floor for this number of images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.checkpoint import load_json, load_tensors, save_json, save_tensors
from glassbox.device import resolve_device
from glassbox.diffusion.data import SIZES, ImageSet, load_data, shape_caption
from glassbox.diffusion.model import load_model
from glassbox.diffusion.pipeline import DiffusionPipeline, save_png, to_pil
from glassbox.errors import GlassboxError
from glassbox.track import save_figure

# ---------------------------------------------------------------------------------------
# The judge: a small CNN trained on real images
# ---------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """conv-conv-pool-conv-pool -> 64 features -> one linear head per attribute."""

    def __init__(self, in_channels: int, image_size: int, head_sizes: list[int], feat: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, feat), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleList(nn.Linear(feat, n) for n in head_sizes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> (B, feat)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [head(f) for head in self.heads]


def train_classifier(
    train: ImageSet, heldout: ImageSet, steps: int = 600, seed: int = 0
) -> tuple[Classifier, dict[str, float]]:
    """Fit the judge on real training images; return it and its held-out accuracies."""
    if train.attributes is None:
        raise GlassboxError(
            "This data has captions but no labels, so there is nothing for a classifier to "
            "check; eval supports builtin:shapes, builtin:digits and labelled folders."
        )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(v) for v in train.attribute_names.values()]
    clf = Classifier(train.images.shape[1], train.images.shape[-1], sizes)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=gen)
        x = train.images[idx]
        # Mild noise so that the judge is not thrown by a generator's small artifacts.
        x = x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(
            x.shape, generator=gen
        )
        logits = clf(x)
        loss = sum(F.cross_entropy(lg, train.attributes[idx, i]) for i, lg in enumerate(logits))
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    acc = attribute_accuracy(clf, heldout.images, heldout.attributes, heldout.attribute_names)
    return clf, acc


@torch.no_grad()
def attribute_accuracy(
    clf: Classifier, images: torch.Tensor, wanted: torch.Tensor, names: dict[str, list[str]]
) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the wanted one, per attribute."""
    preds = [
        torch.cat([lg.argmax(-1) for lg in _chunks(clf, images)[i]]) for i in range(len(names))
    ]
    hits = torch.stack([p == wanted[:, i] for i, p in enumerate(preds)], dim=1)  # (N, A)
    acc = {k: hits[:, i].float().mean().item() for i, k in enumerate(names)}
    if "shape" in names and "colour" in names:
        keys = list(names)
        both = hits[:, keys.index("shape")] & hits[:, keys.index("colour")]
        acc["shape+colour"] = both.float().mean().item()
    acc["all"] = hits.all(dim=1).float().mean().item()
    return acc


def _chunks(clf: Classifier, images: torch.Tensor, size: int = 512) -> list[list[torch.Tensor]]:
    outs = [clf(images[i : i + size]) for i in range(0, len(images), size)]
    return [[o[h] for o in outs] for h in range(len(clf.heads))]


@torch.no_grad()
def features(clf: Classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([clf.features(images[i : i + 512]) for i in range(0, len(images), 512)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64.

    tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    which is symmetric, so ``eigvalsh`` is stable and no scipy is needed.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    s_a_half = (v * w.clamp(min=0).sqrt()) @ v.T
    m = s_a_half @ s_b @ s_a_half
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def parse_samplers(spec: str) -> list[tuple[str, int]]:
    """'ddim:10,ddpm:1000' -> [('ddim', 10), ('ddpm', 1000)]."""
    rows = []
    for part in spec.split(","):
        name, _, steps = part.strip().partition(":")
        if name not in ("ddim", "ddpm") or not steps.isdigit() or int(steps) < 1:
            raise GlassboxError(
                f"Bad sampler entry {part!r}: write sampler:steps with sampler ddim or ddpm and "
                "steps >= 1, e.g. ddim:50,ddpm:1000."
            )
        rows.append((name, int(steps)))
    return rows


def parse_guidance(spec: str) -> list[float]:
    try:
        values = [float(g) for g in spec.split(",")]
    except ValueError as e:
        raise GlassboxError(f"Bad guidance list {spec!r}: write numbers like 0,1,3,5.") from e
    if any(g < 0 for g in values):
        raise GlassboxError(f"Guidance scales must be >= 0, got {spec!r}.")
    return values


PROMPT_SETS = ("train", "combos")


def eval_conditions(
    data: ImageSet, num: int, seed: int, prompts: str = "train"
) -> tuple[list, torch.Tensor]:
    """Prompts (or labels) to generate, and the attribute ids each one requests.

    ``prompts="train"``: random attributes as in training (without the held-out
    colour+shape pairs of ``builtin:shapes-holdout``); ``"combos"``: only those pairs."""
    if prompts not in PROMPT_SETS:
        raise GlassboxError(f"--prompts {prompts!r}: use one of {', '.join(PROMPT_SETS)}.")
    if prompts == "combos" and not data.heldout_combos:
        raise GlassboxError(
            "--prompts combos needs a model trained on data with held-out colour+shape "
            "pairs (builtin:shapes-holdout); this one saw every pair."
        )
    g = torch.Generator().manual_seed(seed)
    if data.captions is not None:  # builtin:shapes: full captions, random attributes
        names = data.attribute_names
        wanted = _draw_attributes(names, num, g)
        if data.heldout_combos:
            keys = list(names)
            held = [(names["colour"].index(c), names["shape"].index(s))
                    for c, s in data.heldout_combos]  # fmt: skip
            if prompts == "combos":
                pick = torch.randint(0, len(held), (num,), generator=g)
                wanted[:, keys.index("colour")] = torch.tensor([held[i][0] for i in pick])
                wanted[:, keys.index("shape")] = torch.tensor([held[i][1] for i in pick])
            else:  # redraw held-out pairs until every prompt is a pair seen in training
                pairs = wanted[:, [keys.index("colour"), keys.index("shape")]]
                bad = torch.tensor([tuple(p) in held for p in pairs.tolist()], dtype=torch.bool)
                while bad.any():
                    wanted[bad] = _draw_attributes(names, int(bad.sum()), g)
                    pairs = wanted[:, [keys.index("colour"), keys.index("shape")]]
                    bad = torch.tensor([tuple(p) in held for p in pairs.tolist()])
        shapes, colours, positions = names["shape"], names["colour"], names["position"]
        texts = [
            shape_caption(shapes[s], colours[c], SIZES[z], positions[p])
            for s, c, z, p in wanted.tolist()
        ]
        return texts, wanted
    k = len(data.class_names)
    wanted = (torch.arange(num) % k)[:, None]
    return wanted[:, 0].tolist(), wanted


def _draw_attributes(names: dict[str, list[str]], num: int, g: torch.Generator) -> torch.Tensor:
    """(num, A) uniformly random attribute ids."""
    return torch.stack([torch.randint(0, len(v), (num,), generator=g) for v in names.values()], 1)


@dataclass
class EvalResult:
    rows: list[dict]
    classifier_heldout: dict[str, float]
    out_dir: Path
    markdown: str = ""
    meta: dict = field(default_factory=dict)


def evaluate_run(
    run_dir: str | Path,
    samplers: list[tuple[str, int]],
    guidance: list[float],
    num: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    out: str | Path | None = None,
    device: str | None = None,
    classifier_steps: int = 600,
    prompts: str = "train",
) -> EvalResult:
    """Generate ``num`` images per cell, score them, write results.json/.md and a plot.

    ``prompts``: "train" (the training distribution) or "combos" (the colour+shape pairs
    a ``builtin:shapes-holdout`` model never saw). The judge is always trained on every
    pair (``builtin:shapes`` for a holdout run), so it can recognise the held-out ones."""
    if num < 2:
        raise GlassboxError(f"--num {num} is too small: the Frechet distance needs >= 2 images.")
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    model = load_model(run_dir, dev)
    raw = load_json(run_dir / "config.json")
    tcfg = raw["train"]
    out_dir = Path(out) if out is not None else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    train = load_data(tcfg["data"], "train", tcfg["image_size"], tcfg["num_images"])
    conds, wanted = eval_conditions(train, num, seed, prompts)
    # The judge learns every colour+shape pair, those a holdout run never saw included.
    judge_data = "builtin:shapes" if train.heldout_combos else tcfg["data"]
    if judge_data != tcfg["data"]:
        train = load_data(judge_data, "train", tcfg["image_size"], tcfg["num_images"])
    heldout = load_data(judge_data, "heldout", tcfg["image_size"], tcfg["num_images"])
    if train.attributes is None:
        raise GlassboxError(
            f"{tcfg['data']} has captions but no labels: eval needs builtin:shapes, "
            "builtin:digits or a folder whose rows have a 'label'."
        )
    clf, clf_acc = _cached_classifier(out_dir, train, heldout, classifier_steps)
    real_feats = features(clf, heldout.images)

    names = train.attribute_names
    g = torch.Generator().manual_seed(seed + 1)
    ref = train.images[torch.randperm(len(train), generator=g)[:num]]
    rows = [{"sampler": "real", "steps": 0, "guidance": None, "n": len(ref),
             "fd": frechet_distance(features(clf, ref), real_feats),
             "accuracy": clf_acc, "seconds": 0.0, "images_per_s": None}]  # fmt: skip
    pipe = DiffusionPipeline(model, dev)
    (out_dir / "grids").mkdir(exist_ok=True)
    for sampler, steps in samplers:
        for scale in guidance:
            t0 = time.perf_counter()
            imgs = pipe(conds, steps=steps, sampler=sampler, guidance=scale, seed=seed,
                        batch_size=batch_size).images  # fmt: skip
            secs = time.perf_counter() - t0
            x = imgs * 2 - 1  # back to [-1, 1], the classifier's input range
            acc = attribute_accuracy(clf, x, wanted, names)
            fd = frechet_distance(features(clf, x), real_feats)
            rows.append({"sampler": sampler, "steps": steps, "guidance": scale, "n": num,
                         "fd": fd, "accuracy": acc, "seconds": secs,
                         "images_per_s": num / secs})  # fmt: skip
            nrow = 8 if train.captions is not None else len(train.class_names)
            grid = to_pil(imgs[: 4 * nrow], nrow=nrow)
            save_png(grid, out_dir / "grids" / f"{sampler}{steps}_g{scale:g}.png")
            _save(out_dir, rows, clf_acc, raw, prompts)  # partial results survive interruption

    headline = "shape+colour" if "shape+colour" in clf_acc else list(names)[0]
    md = _markdown(rows, samplers, guidance, headline, list(clf_acc), num, len(real_feats))
    (out_dir / "results.md").write_text(md)
    _plot(rows, guidance, headline, out_dir / "tradeoff.png")
    return EvalResult(rows, clf_acc, out_dir, md, {"headline": headline})


def _cached_classifier(
    out_dir: Path, train: ImageSet, heldout: ImageSet, steps: int
) -> tuple[Classifier, dict[str, float]]:
    """Train the judge once per eval folder; later evals reuse it (same data, same seed)."""
    sizes = [len(v) for v in train.attribute_names.values()]
    clf = Classifier(train.images.shape[1], train.images.shape[-1], sizes)
    wpath, jpath = out_dir / "classifier.safetensors", out_dir / "classifier.json"
    if wpath.is_file() and jpath.is_file():
        meta = load_json(jpath)
        if meta.get("sizes") == sizes and meta.get("steps") == steps:
            clf.load_state_dict(load_tensors(wpath))
            return clf.eval(), meta["heldout_accuracy"]
    clf, acc = train_classifier(train, heldout, steps=steps)
    save_tensors(clf.state_dict(), wpath)
    save_json({"sizes": sizes, "steps": steps, "heldout_accuracy": acc}, jpath)
    return clf, acc


def _save(out_dir: Path, rows: list[dict], clf_acc: dict, raw: dict, prompts: str) -> None:
    save_json({"rows": rows, "classifier_heldout_accuracy": clf_acc, "run": raw["train"],
               "prompts": prompts}, out_dir / "results.json")  # fmt: skip


def _markdown(rows, samplers, guidance, headline, keys, num, n_real) -> str:
    real = rows[0]
    lines = [
        f"Accuracy of `{headline}` (classifier on generated images) / Frechet distance in the "
        f"classifier's feature space vs {n_real} held-out real images; {num} images per cell.",
        "",
        "| sampler | " + " | ".join(f"guidance {g:g}" for g in guidance) + " |",
        "|---|" + "---|" * len(guidance),
    ]
    for sampler, steps in samplers:
        cells = []
        for g in guidance:
            r = next(r for r in rows if r["sampler"] == sampler and r["steps"] == steps
                     and r["guidance"] == g)  # fmt: skip
            cells.append(f"{r['accuracy'][headline]:.1%} / {r['fd']:.2f}")
        lines.append(f"| {sampler} {steps} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Real images: classifier accuracy on held-out real images "
        f"{real['accuracy'][headline]:.1%}; "
        f"FD of {num} real training images vs held-out: {real['fd']:.2f} (the floor).",
        "",
        "All attributes (accuracy), per cell:",
        "",
        "| sampler | guidance | " + " | ".join(keys) + " | FD | images/s |",
        "|---|---|" + "---|" * (len(keys) + 2),
    ]
    for r in rows[1:]:
        accs = " | ".join(f"{r['accuracy'][k]:.1%}" for k in keys)
        lines.append(f"| {r['sampler']} {r['steps']} | {r['guidance']:g} | {accs} | "
                     f"{r['fd']:.2f} | {r['images_per_s']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], guidance: list[float], headline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    labels = sorted({(r["sampler"], r["steps"]) for r in rows[1:]}, key=lambda s: s[1])
    for sampler, steps in labels:
        pts = [r for r in rows[1:] if r["sampler"] == sampler and r["steps"] == steps]
        ax.plot([r["fd"] for r in pts], [r["accuracy"][headline] for r in pts], marker="o",
                label=f"{sampler} {steps}")  # fmt: skip
        for r in pts:
            ax.annotate(f"g={r['guidance']:g}", (r["fd"], r["accuracy"][headline]), fontsize=6)
    ax.axvline(rows[0]["fd"], color="gray", linestyle=":", label="real (FD floor)")
    ax.set_xlabel("Frechet distance to held-out real images (lower = closer)")
    ax.set_ylabel(f"accuracy: {headline}")
    ax.set_title("fidelity vs diversity across guidance scales")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
