"""Progress bars, metrics JSONL and loss-curve PNGs shared by every training stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar with count, elapsed time, ETA and a free-text throughput field.

    Use ``progress.update(task, advance=1, info="12.3k tok/s loss 2.31")``.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=transient,
    )


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed each write).

    A fresh run appends to whatever is there (the run directory starts empty); a resumed
    run first drops the rows written after the snapshot it resumes from, and a line torn
    by a crash mid-write, so the file reads as one clean history.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            from glassbox.checkpoint import atomic_write_bytes

            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file; a torn (unparsable) last line, as a crash leaves, is dropped."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the write a crash interrupted
            raise
    return rows


def plot_curves(
    metrics_path: str | Path,
    png_path: str | Path,
    keys: tuple[str, ...] = ("train_loss", "val_loss"),
    title: str = "loss",
) -> Path:
    """Plot ``keys`` against ``step`` from a metrics JSONL file into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=2.5, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png_path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure (parent directories created)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
