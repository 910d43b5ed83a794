"""The run directory every training recipe writes, and the rules it keeps.

    run = Run.open(cfg, stage="pretrain", d=d, explicit={"max_steps"})
        fresh:   --out must be empty or absent (nothing of another run is overwritten)
        resume:  the newest readable snapshot (an unreadable one is skipped with a warning);
                 the saved config comes back, flags that change the run's shape are
                 refused by name, budget flags (--max-steps, --max-minutes, intervals,
                 --device ...) may change
    run.snapshot         what to restore: trainer state JSON + every tensor file, read
    run.clock            the training clock: evaluation and checkpoint time excluded
    run.log(row)         metrics.jsonl (a torn last line after a crash is tolerated)
    run.save(step, ...)  checkpoints/step_N/ written atomically, the last K kept, and the
                         loadable files (model.safetensors, config.json, ...) at top level
    run.plot(...)        loss.png from metrics.jsonl

Layout::

    out/config.yaml            the recipe's config (edit it and pass --config), written
                               with the first metrics row or snapshot
    out/config.json            model config + stage + version (what loaders read)
    out/model.safetensors      latest weights (plus e.g. tokenizer.json)
    out/metrics.jsonl, loss.png
    out/checkpoints/step_N/    complete snapshots: the loadable files + trainer/
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glassbox import checkpoint as ckpt
from glassbox.errors import GlassboxError
from glassbox.track import MetricsLog, plot_curves
from glassbox.train.distributed import Dist, barrier, rank0_value

# Fields that may change when a run resumes: how long and how often, never what.
BUDGET_FIELDS = frozenset(
    {
        "out", "resume", "max_steps", "max_minutes", "device", "compile", "log_interval",
        "eval_interval", "checkpoint_interval", "keep_last", "sample_interval", "cache_dir",
    }
)  # fmt: skip


@dataclass
class Snapshot:
    """One complete snapshot, read into memory (so a damaged file is found before use)."""

    path: Path
    state: dict[str, Any]  # trainer/state.json: step, elapsed_s, config, counters ...
    tensors: dict[str, dict[str, torch.Tensor]]  # relative .safetensors path -> tensors

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        state = ckpt.load_json(path / "trainer" / "state.json")
        if not isinstance(state, dict) or "step" not in state:
            raise GlassboxError(f"{path / 'trainer' / 'state.json'} has no 'step'.")
        tensors = {
            str(f.relative_to(path)): ckpt.load_tensors(f)
            for f in sorted(path.rglob("*.safetensors"))
        }
        return cls(path, state, tensors)

    @property
    def step(self) -> int:
        return int(self.state["step"])


class Clock:
    """Training seconds: wall time minus everything run inside :meth:`paused`.

    Every process reads rank 0's value, so all agree on the schedule and the end.
    """

    def __init__(self, d: Dist, before: float = 0.0):
        self.d, self.before = d, before
        self.t0 = time.perf_counter()
        self.paused_s = 0.0

    def elapsed(self) -> float:
        return rank0_value(self.before + time.perf_counter() - self.t0 - self.paused_s, self.d)

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> None:
        """Training starts now: everything since the clock was made (reading the corpus,
        training the tokenizer, tokenizing, measurements) is setup, not training."""
        self.paused_s = time.perf_counter() - self.t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t


class Run:
    """A training run's directory: fresh-or-resume rules, snapshots, metrics, clock."""

    def __init__(self, out: Path, cfg, stage: str, d: Dist, snapshot: Snapshot | None):
        self.out, self.cfg, self.stage, self.d = out, cfg, stage, d
        self.snapshot = snapshot
        self.clock = Clock(d, snapshot.state.get("elapsed_s", 0.0) if snapshot else 0.0)
        self._config_written = False
        self.metrics = MetricsLog(
            out / "metrics.jsonl", resume_step=snapshot.step if snapshot else None
        ) if d.main else None  # fmt: skip

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        cfg,
        stage: str,
        d: Dist | None = None,
        explicit: set[str] | None = None,
        may_change: frozenset[str] = BUDGET_FIELDS,
    ) -> Run:
        """Start a fresh run in ``cfg.out`` or resume it (``cfg.resume``).

        ``explicit`` names the config fields the user set (command line or --config);
        ``None`` treats every field as set. On resume those outside ``may_change`` must
        equal the saved run's, and the run goes on with its saved config.
        """
        d = d or Dist()
        out = Path(cfg.out)
        snapshot = None
        if cfg.resume:
            snapshot = latest_readable_snapshot(out)
            cfg = reconcile(cfg, snapshot.state.get("config", {}), explicit, may_change)
        else:
            refuse_non_empty(out)
        barrier(d)  # every rank checked the directory before rank 0 writes to it
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        return cls(out, cfg, stage, d, snapshot)

    # -- metrics and pictures ---------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self._write_config()
            self.metrics.write(row)

    def _write_config(self) -> None:
        """config.yaml of a fresh run, written once training has produced something: a
        run that fails on its input before that leaves --out empty, so the same command
        with the input fixed starts cleanly."""
        if self.snapshot is None and not self._config_written:
            ckpt.atomic_write_bytes(self.out / "config.yaml", config_yaml(self.cfg).encode())
            self._config_written = True

    def plot(self, keys: tuple[str, ...] = ("train_loss", "val_loss"), title: str = "loss"):
        if self.d.main:
            plot_curves(self.out / "metrics.jsonl", self.out / "loss.png", keys, title)

    # -- snapshots --------------------------------------------------------------------

    def save(
        self,
        step: int,
        files: dict[str, bytes],
        trainer: dict[str, dict[str, torch.Tensor]],
        state: dict[str, Any],
    ) -> None:
        """Write ``checkpoints/step_N`` and the loadable ``files`` at top level.

        Call it on every rank (the clock is read collectively); rank 0 writes.

        ``files`` are what a loader needs (model.safetensors, config.json, ...);
        ``trainer`` maps names to tensors saved as trainer/NAME.safetensors (optimizer,
        RNG, extra models); ``state`` is JSON saved in trainer/state.json with the step,
        the training clock, the world size and the config added.
        """
        elapsed = self.clock.elapsed()
        if not self.d.main:
            return
        self._write_config()
        state = {
            **state,
            "step": step,
            "elapsed_s": elapsed,
            "world_size": self.d.world,
            "stage": self.stage,
            "config": config_dict(self.cfg),
        }
        snap_files = dict(files)
        for name, tensors in trainer.items():
            snap_files[f"trainer/{name}.safetensors"] = ckpt.tensors_bytes(tensors)
        snap_files["trainer/state.json"] = ckpt.json_bytes(state)
        ckpt.write_snapshot(self.out, step, snap_files, self.cfg.keep_last)
        for name, data in files.items():  # the latest weights, for generate/serve/export
            ckpt.atomic_write_bytes(self.out / name, data)

    def check_world(self) -> None:
        """Refuse to resume on another number of processes (data streams would differ)."""
        if self.snapshot is None:
            return
        saved = self.snapshot.state.get("world_size", 1)
        if saved != self.d.world:
            raise GlassboxError(
                f"{self.snapshot.path} was saved by {saved} processes but this run has "
                f"{self.d.world}; resume with the same number of processes."
            )


# ---------------------------------------------------------------------------------------
# Directory rules and config reconciliation
# ---------------------------------------------------------------------------------------


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a run" if (out / "config.json").exists() or (out / "checkpoints").exists() else (
            "files"
        )  # fmt: skip
        raise GlassboxError(
            f"{out} already holds {what}; pass --resume to continue a run there, or choose a "
            "new (empty) --out so nothing is overwritten."
        )


def latest_readable_snapshot(out: Path) -> Snapshot:
    """The newest snapshot that reads completely; damaged newer ones are skipped loudly."""
    snaps = ckpt.list_snapshots(out)
    if not snaps:
        raise GlassboxError(f"--resume: {out} has no snapshot in checkpoints/ to resume from.")
    errors = []
    for path in reversed(snaps):
        try:
            snap = Snapshot.read(path)
        except GlassboxError as e:
            errors.append(str(e))
            print(f"warning: skipping unreadable snapshot {path}: {e}", file=sys.stderr)
            continue
        return snap
    raise GlassboxError(f"--resume: no snapshot in {out / 'checkpoints'} is readable: {errors[0]}")


def reconcile(cfg, saved: dict, explicit: set[str] | None, may_change: frozenset[str]):
    """The saved config, with the user's budget changes; shape changes are refused."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    given = fields if explicit is None else explicit & fields
    current = config_dict(cfg)
    changed = [
        f for f in sorted(given - may_change)
        if f in saved and _norm(current[f]) != _norm(saved[f])
    ]  # fmt: skip
    if changed:
        detail = ", ".join(
            f"--{f.replace('_', '-')} {saved[f]!r} -> {current[f]!r}" for f in changed
        )
        raise GlassboxError(
            f"--resume keeps the run's own settings, but these differ from the saved run: "
            f"{detail}. Drop them to resume, or start a new run with a new --out."
        )
    merged = {k: v for k, v in saved.items() if k in fields}
    merged |= {f: current[f] for f in given & may_change}
    merged["resume"], merged["out"] = True, current["out"]
    return type(cfg)(**merged)


def _norm(value: Any) -> Any:
    return [_norm(v) for v in value] if isinstance(value, list | tuple) else value


def config_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg) -> str:
    """The recipe's config as YAML for ``--config`` (without where/whether to resume)."""
    import yaml

    data = {k: v for k, v in config_dict(cfg).items() if k not in ("out", "resume")}
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
