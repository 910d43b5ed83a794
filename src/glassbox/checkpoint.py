"""Checkpoint directories: safetensors and JSON only, written atomically.

Every file is written to a temporary name in the same directory, flushed and fsynced,
then renamed over the target, so a crash leaves either the old file or the new one,
never half of one. Whole snapshot directories (``checkpoints/step_000100``) are built
under a temporary name and renamed into place the same way. Nothing pickled is loaded.

Layout of a run directory::

    config.json          model config + glassbox version + stage
    model.safetensors    weights (the latest)
    tokenizer.json       tokenizer (tokenizers format)
    metrics.jsonl        one JSON object per evaluation
    checkpoints/step_N/  complete snapshots for --resume: model, config, trainer/
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from glassbox.errors import GlassboxError

SNAPSHOT_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    """The process umask (read once, at import: setting it is process-wide)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what open()/mkdir() would give


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    The file gets the mode a plain ``open()`` would give (not mkstemp's private 0600),
    so other users and tools read checkpoints as the umask allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file raises a clear GlassboxError."""
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"Missing file {path}: is this a glassbox run directory?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GlassboxError(
            f"{path} is not valid JSON ({e}); the checkpoint is corrupted or partial. "
            "Resume from an earlier snapshot or retrain."
        ) from e


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (tensors are made contiguous CPU copies)."""
    atomic_write_bytes(path, tensors_bytes(tensors, metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; missing or corrupted files raise a clear GlassboxError."""
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"Missing file {path}: is this a glassbox run directory?")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise GlassboxError(
            f"Cannot read {path} ({e}); the file is corrupted or partial. "
            "Resume from an earlier snapshot or retrain."
        ) from e


# ---------------------------------------------------------------------------------------
# Snapshot directories
# ---------------------------------------------------------------------------------------


def write_snapshot(run_dir: str | Path, step: int, files: dict[str, bytes], keep_last: int) -> Path:
    """Write ``files`` (relative name -> bytes) as ``run_dir/checkpoints/step_N`` atomically.

    The snapshot is assembled in a temporary directory, fsynced, and renamed into place;
    then all but the newest ``keep_last`` snapshots are removed.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{SNAPSHOT_PREFIX}*"):  # half-built by a process that died
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{SNAPSHOT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    tmp.chmod(DIR_MODE)  # mkdtemp's is private (0700)
    try:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_snapshots(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """Complete snapshot directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    snaps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(SNAPSHOT_PREFIX)]
    return sorted(snaps, key=lambda p: int(p.name[len(SNAPSHOT_PREFIX) :]))


def latest_snapshot(run_dir: str | Path) -> Path | None:
    snaps = list_snapshots(run_dir)
    return snaps[-1] if snaps else None


def tensors_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """Serialize tensors to safetensors bytes (for building snapshots)."""
    return save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata
    )


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------
# Optimizer and RNG state without pickle
# ---------------------------------------------------------------------------------------


def optimizer_state_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and JSON metadata.

    Keys are ``PARAM.NAME`` where PARAM is a parameter id or name (names hold dots; the
    state names such as ``exp_avg`` do not).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "tensor_keys": sorted(tensors)}
    return tensors, meta


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild an optimizer state dict from :func:`optimizer_state_to_tensors` output."""
    state: dict[Any, dict[str, Any]] = {}

    def key(pid: str) -> Any:
        return int(pid) if pid.isdigit() else pid

    for name, value in tensors.items():
        pid, field = name.rsplit(".", 1)
        state.setdefault(key(pid), {})[field] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(key(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------
# Model directories (config.json + model.safetensors + tokenizer.json)
# ---------------------------------------------------------------------------------------


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without tied duplicates (safetensors stores each tensor once)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def config_record(model_cfg, stage: str, extra: dict | None = None) -> dict:
    """config.json of a language-model checkpoint: architecture, stage, version, shape."""
    from glassbox import __version__

    head = {"architecture": "transformer", "stage": stage, "glassbox_version": __version__}
    return head | {"model": model_cfg.to_dict()} | (extra or {})


def save_model_dir(out: str | Path, model, tokenizer, stage: str, extra: dict | None = None):
    """Write config.json, model.safetensors and tokenizer.json into ``out`` atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(model_state(model), out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(out / "tokenizer.json")
    save_json(config_record(model.cfg, stage, extra), out / "config.json")


# ---------------------------------------------------------------------------------------
# Stage-aware loading: config.json names the architecture; a registry builds it
# ---------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What :func:`load_checkpoint` returns: the model (eval mode), its tokenizer or text
    front end (None when it has none), the config.json record and the architecture."""

    model: torch.nn.Module
    tokenizer: Any
    record: dict
    architecture: str


Loader = Callable[[Path, dict, torch.device], Loaded]
LOADERS: dict[str, Loader] = {}
_BUILTIN_LOADERS = (
    "glassbox.model",
    "glassbox.diffusion.model",
    "glassbox.train.reward",
    "glassbox.vision.clip",
    "glassbox.vision.vlm",
)


def register_loader(architecture: str) -> Callable[[Loader], Loader]:
    """Decorator: ``@register_loader("reward")`` makes :func:`load_checkpoint` build
    checkpoints whose config.json says ``"architecture": "reward"`` with this function."""

    def add(fn: Loader) -> Loader:
        LOADERS[architecture] = fn
        return fn

    return add


def read_record(path: str | Path) -> dict:
    """A checkpoint directory's config.json, checked to be one."""
    path = Path(path)
    if not path.is_dir():
        raise GlassboxError(
            f"Checkpoint directory {path} does not exist; pass the --out directory of a "
            "glassbox training run (or an imported model)."
        )
    record = load_json(path / "config.json")
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise GlassboxError(f"{path / 'config.json'} has no 'model' section; not a glassbox run.")
    return record


def architecture_of(record: dict) -> str:
    """The record's architecture (runs from before the field existed: from the stage)."""
    if "architecture" in record:
        return str(record["architecture"])
    return "denoiser" if record.get("stage") == "diffusion" else "transformer"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Load any glassbox checkpoint directory, dispatching on its architecture."""
    import importlib

    for module in _BUILTIN_LOADERS:  # each registers its loader when imported
        importlib.import_module(module)
    path = Path(path)
    record = read_record(path)
    arch = architecture_of(record)
    if arch not in LOADERS:
        raise GlassboxError(
            f"{path / 'config.json'} says architecture {arch!r}, which this glassbox cannot "
            f"load (known: {', '.join(sorted(LOADERS))}); upgrade glassbox or check the path."
        )
    return LOADERS[arch](path, record, torch.device(device))


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """Load a language model: (model, tokenizer, config record); clear error otherwise."""
    loaded = load_checkpoint(path, device)
    if loaded.architecture != "transformer":
        raise GlassboxError(
            f"{path} holds a {loaded.architecture!r} checkpoint "
            f"(stage {loaded.record.get('stage')!r}), not a language model; point at a "
            "`glassbox pretrain` run or an imported model."
        )
    return loaded.model, loaded.tokenizer, loaded.record


def load_weights(model: torch.nn.Module, path: Path, device: torch.device, tied: bool) -> None:
    """Load ``path`` into ``model`` strictly (a tied LM head may be absent)."""
    state = load_tensors(path, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise GlassboxError(
            f"{path} does not match config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. The checkpoint is corrupted or from another model."
        )
