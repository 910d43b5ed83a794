"""Precision chosen by measurement on the machine at hand, for decoding and for training.

Half precision halves the bytes a decode step reads, but whether a CPU turns that into
speed depends on its kernels: with AVX-512 BF16 a bf16 matrix-vector product can be 3x
faster than fp32, on an AVX2-only CPU it can be many times slower. So nothing here
assumes; like oneDNN picking kernels by CPU features, the choice is measured:

    choose_dtype(model, tokenizer)          decoding: "auto" | "fp32" | "bf16" | "fp16"
        1. speed: matrix-vector products of the model's own weight shapes, batch 1, in
           each candidate precision (cached per CPU, flags, threads, torch and shapes)
        2. accuracy: the fp32 model continues a probe prompt greedily; each faster
           candidate reads the same tokens, and must pick the same next token at
           >= 90% of the positions with max |logit diff| <= 0.1 x the logits' std
        3. the fastest candidate that passes wins, else fp32, with the reason said
    choose_train_precision(cfg, tokens)     training: "auto" | "fp32" | "bf16" autocast
        forward + backward of the model's linear shapes at the micro-batch's token
        count, fp32 vs bf16 autocast (master weights stay fp32)

On a GPU, ``auto`` is bf16 (fp16 where bf16 is unsupported) for both, still checked by
the accuracy probe for decoding. The KV cache follows the weights' dtype; sampling and
log-probabilities stay in fp32 (the engine upcasts the logits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.errors import GlassboxError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CHOICES = ("auto", *DTYPES)
TRAIN_CHOICES = ("auto", "fp32", "bf16")

MIN_SPEEDUP = 1.15  # a half precision must beat fp32 by this much to be worth its error
MIN_AGREEMENT = 0.9  # greedy agreement with fp32 over the probe's positions
MAX_REL_DIFF = 0.1  # max |logit - fp32 logit| / std of the fp32 logits
PROBE_TEXT = "def main():\n    print('The quick brown fox jumps over the lazy dog.')\n"
PROBE_TOKENS = 16
CACHE_FILE = "precision.json"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One candidate precision against fp32 on the probe prompt (teacher-forced)."""

    name: str  # the candidate: "bf16" or "fp16"
    agree: int  # positions where the candidate's argmax is fp32's greedy token
    total: int  # probe positions
    max_diff: float  # max |logit - fp32 logit| over those positions and the vocabulary
    scale: float  # std of the fp32 logits (the unit of max_diff)

    @property
    def rel_diff(self) -> float:
        return self.max_diff / max(self.scale, 1e-12)

    def summary(self) -> str:
        return (
            f"greedy agreement {self.agree}/{self.total}, max logit diff {self.max_diff:.3g} "
            f"({self.rel_diff:.3g} x logit std)"
        )


def default_check(probe: Probe) -> str | None:
    """The documented tolerance: None when ``probe`` passes, else why it fails."""
    if probe.agree < MIN_AGREEMENT * probe.total:
        return f"greedy agreement {probe.agree}/{probe.total} < {MIN_AGREEMENT:.0%}"
    if not math.isfinite(probe.max_diff) or probe.rel_diff > MAX_REL_DIFF:
        return f"max logit diff {probe.rel_diff:.3g} x logit std > {MAX_REL_DIFF}"
    return None


@dataclass
class PrecisionChoice:
    """What a model decodes in, and why."""

    name: str  # "fp32", "bf16" or "fp16"
    requested: str  # "auto" or the explicit name
    reason: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per matvec sweep
    probes: dict[str, Probe] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def line(self) -> str:
        """One line for the terminal: 'dtype auto: bf16 (2.9x faster ... )'."""
        return f"dtype {self.requested}: {self.name} ({self.reason})"


@dataclass
class TrainPrecision:
    """Whether training runs under bf16 autocast, and why."""

    name: str  # "fp32" or "bf16"
    requested: str
    reason: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per fwd+bwd sweep

    def line(self) -> str:
        return f"precision {self.requested}: {self.name} ({self.reason})"

    def record(self) -> dict:
        return asdict(self)


def check_name(value: str, choices: tuple[str, ...], flag: str) -> str:
    """``value`` lower-cased if it is one of ``choices``; a clear error otherwise."""
    name = (value or "auto").lower()
    if name not in choices:
        raise GlassboxError(f"{flag}={value!r} is not a precision; choose {', '.join(choices)}.")
    return name


# --------------------------------------------------------------------------------------
# Measuring speed (cached per machine, torch and shapes)
# --------------------------------------------------------------------------------------


def machine_key() -> dict:
    """What a timing depends on besides the shapes: CPU model and flags, threads, torch."""
    cpu, flags = "unknown", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    return {
        "cpu": cpu,
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _cache_path(cache_dir: str | Path | None) -> Path:
    from glassbox.data.tokens import cache_root

    return Path(cache_dir) if cache_dir else cache_root()


_BUSY_MEMO: dict[str, dict] = {}


def busy() -> str | None:
    """Why timings taken now would mislead (other work sharing the CPUs), or None."""
    with contextlib.suppress(OSError, AttributeError):
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        if load > cpus:
            return f"load {load:.1f} on {cpus} CPUs"
    return None


def cached_timings(kind: str, shapes: dict, cache_dir, measure: Callable[[], dict]) -> dict:
    """``measure()`` once per (machine, kind, shapes), kept in CACHE_FILE (JSON, atomic).

    A measurement taken while the machine is busy (load average above its CPU count)
    is used but not kept: multi-threaded half-precision kernels suffer most from
    sharing, so one busy moment must not decide for every later run.
    """
    from glassbox.checkpoint import atomic_write_bytes

    key_obj = {"kind": kind, "shapes": shapes, **machine_key()}
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:24]
    path = _cache_path(cache_dir) / CACHE_FILE
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    hit = table.get(key) or _BUSY_MEMO.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("timings"), dict):
        return hit["timings"]
    timings = measure()
    if busy() is not None:  # kept for this process only, so its decisions agree
        _BUSY_MEMO[key] = {"timings": timings}
        return timings
    table[key] = {"timings": timings, "key": key_obj, "measured_at": int(time.time())}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-measurement
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(table, indent=1, sort_keys=True).encode())
    return timings


def linear_shapes(model: nn.Module) -> dict[str, int]:
    """'out x in' -> how many linear layers of that shape one forward pass runs."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            counts[f"{m.out_features}x{m.in_features}"] += 1
    return dict(sorted(counts.items()))


def _parse(shape: str) -> tuple[int, int]:
    out, inp = shape.split("x")
    return int(out), int(inp)


def _copies(shapes: dict[str, int], budget_bytes: int = 32 << 20) -> dict[str, int]:
    """Distinct copies of each shape to cycle through, so the weights are streamed from
    memory as in a real decode step, not served from cache (at most its count)."""
    out = {}
    for s, count in shapes.items():
        o, i = _parse(s)
        out[s] = max(1, min(count, math.ceil(budget_bytes / (4 * o * i))))
    return out


def measure_matvec(
    shapes: dict[str, int], names: list[str], repeats: int = 5, rows: int = 1
) -> dict:
    """Seconds per decode step's worth of matrix-vector products (``rows`` sequences
    at once) in each precision: every shape timed over distinct weight copies, scaled by its count.
    The precisions are interleaved so a busy machine slows each alike, and each shape
    keeps its fastest repeat (interference only ever adds time)."""
    copies = _copies(shapes)
    need = max(c * math.prod(_parse(s)) for s, c in copies.items())
    buf32 = torch.empty(need).fill_(0.01)  # written memory (not the shared zero page)
    per: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in names}
    for name in names:
        buf = buf32 if name == "fp32" else buf32.to(DTYPES[name])
        for s in shapes:  # warm-up: kernels chosen, pages touched
            o, i = _parse(s)
            F.linear(torch.ones(rows, i, dtype=buf.dtype), buf[: o * i].view(o, i))
        del buf
    live = list(names)
    for _ in range(repeats):
        for name in live:
            buf = buf32 if name == "fp32" else buf32.to(DTYPES[name])
            for s, k in copies.items():
                o, i = _parse(s)
                ws = buf[: k * o * i].view(k, o, i)
                x = torch.ones(rows, i, dtype=buf.dtype)
                t = time.perf_counter()
                for j in range(k):
                    F.linear(x, ws[j])
                per[name][s].append((time.perf_counter() - t) / k)
            del buf
        step = {n: sum(shapes[s] * min(ts) for s, ts in per[n].items()) for n in names}
        live = [n for n in live if n == "fp32" or step[n] < 3 * step["fp32"]]  # hopeless: out
    return step


# --------------------------------------------------------------------------------------
# Checking accuracy
# --------------------------------------------------------------------------------------


def probe_ids(model: nn.Module, tokenizer) -> list[int]:
    """The probe prompt as token ids, leaving room for PROBE_TOKENS in the context."""
    cfg = model.cfg
    if tokenizer is not None:
        ids = [tokenizer.eot_id, *tokenizer.encode(PROBE_TEXT)]
    else:
        ids = [(7 * i + 3) % cfg.vocab_size for i in range(24)]
    room = max(1, cfg.context_length - PROBE_TOKENS)
    return ids[:room]


@torch.inference_mode()
def fp32_reference(model: nn.Module, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """fp32 greedy continuation of ``ids`` by ``n`` tokens and its logits (n, V)."""
    device = next(model.parameters()).device
    seq, rows = list(ids), []
    n = min(n, model.cfg.context_length - len(ids))
    for _ in range(n):
        logits = model(torch.tensor([seq], device=device), last_only=True)[0, -1].float()
        rows.append(logits)
        seq.append(int(logits.argmax()))
    return seq[len(ids) :], torch.stack(rows)


@torch.inference_mode()
def compare(
    model: nn.Module, ids: list[int], ref_tokens: list[int], ref_logits: torch.Tensor
) -> Probe:
    """Teacher-forced: ``model`` reads prompt + fp32's tokens in one forward pass."""
    device = next(model.parameters()).device
    full = torch.tensor([ids + ref_tokens], device=device)
    n = len(ref_tokens)
    logits = model(full)[0, len(ids) - 1 : len(ids) - 1 + n].float()  # (n, V)
    agree = int((logits.argmax(-1).cpu() == torch.tensor(ref_tokens)).sum())
    diff = (logits - ref_logits).abs().max().item()
    name = next(k for k, v in DTYPES.items() if v == next(model.parameters()).dtype)
    return Probe(name, agree, n, diff, ref_logits.std().item())


@contextlib.contextmanager
def cast_temporarily(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``model`` cast to ``dtype`` in place, its own tensors put back afterwards."""
    params = [(p, p.data) for p in model.parameters()]
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    model.to(dtype)
    try:
        yield model
    finally:
        for p, data in params:
            p.data = data
        for m, n, b in buffers:
            m._buffers[n] = b


# --------------------------------------------------------------------------------------
# Deciding
# --------------------------------------------------------------------------------------


def _device_of(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _gpu_half() -> str:
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def choose_dtype(
    model: nn.Module,
    tokenizer=None,
    requested: str = "auto",
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], object] | None = print,
    check: Callable[[Probe], str | None] = default_check,
    batch: int = 1,
) -> PrecisionChoice:
    """Decide what ``model`` (fp32 weights) decodes in; the model is left unchanged.

    ``auto`` on CPU: the fastest of fp32/bf16/fp16 by measured matvec speed among those
    at least MIN_SPEEDUP x faster than fp32 that pass ``check`` on the probe, else fp32.
    On CUDA: bf16 (fp16 without bf16 support) if it passes ``check``. An explicit name
    is used as given, with a warning when cached timings say it is slower than fp32.
    ``batch`` > 1 (an engine decoding that many sequences together: a server's slots,
    RL rollouts) also times the products at that many rows, and a half precision slower
    than fp32 there is not taken (fp16 matmuls without AVX-512 FP16 can be fast as
    matrix-vector products and slow as matrix-matrix ones). ``log`` gets the one-line
    decision (None = silent).
    """
    requested = check_name(requested, CHOICES, "--dtype")
    dev = _device_of(model, device)
    if requested != "auto":
        choice = PrecisionChoice(requested, requested, "as requested")
        if dev.type == "cpu" and requested != "fp32":
            choice.timings = cached_timings(
                "decode", linear_shapes(model), cache_dir,
                lambda: measure_matvec(linear_shapes(model), list(DTYPES)),
            )  # fmt: skip
            ratio = choice.timings["fp32"] / choice.timings[requested]
            choice.reason += f"; {ratio:.2f}x fp32's matvec speed on this CPU"
            if ratio < 1:
                choice.reason += " - slower: --dtype auto would choose by measurement"
    elif dev.type == "cuda":
        choice = _decide(model, tokenizer, [_gpu_half()], {}, check, "GPU default")
    elif dev.type == "cpu":
        shapes = linear_shapes(model)
        timings = cached_timings(
            "decode", shapes, cache_dir, lambda: measure_matvec(shapes, list(DTYPES))
        )
        fast = [n for n in ("bf16", "fp16") if timings["fp32"] / timings[n] >= MIN_SPEEDUP]
        slow_batched = []
        if batch > 1 and fast:
            wide = cached_timings(
                f"decode-{batch}", shapes, cache_dir,
                lambda: measure_matvec(shapes, list(DTYPES), rows=batch),
            )  # fmt: skip
            slow_batched = [n for n in fast if wide[n] > wide["fp32"]]
            fast = [n for n in fast if n not in slow_batched]
        fast.sort(key=lambda n: timings[n])
        choice = _decide(model, tokenizer, fast, timings, check, "")
        for n in slow_batched:
            choice.reason += f"; {n} not taken: slower than fp32 at {batch} sequences"
    else:
        choice = PrecisionChoice("fp32", requested, f"{dev.type}: fp32 (not measured)")
    if log is not None:
        log(choice.line())
    return choice


def _decide(model, tokenizer, candidates, timings, check, note) -> PrecisionChoice:
    """The first of ``candidates`` (fastest first) whose probe passes, else fp32."""
    if not candidates:
        best = min(("bf16", "fp16"), key=lambda n: timings[n])
        return PrecisionChoice(
            "fp32", "auto",
            f"no half precision is {MIN_SPEEDUP}x faster here: {_speeds(timings, best)}",
            timings,
        )  # fmt: skip
    ids = probe_ids(model, tokenizer)
    ref_tokens, ref_logits = fp32_reference(model, ids, PROBE_TOKENS)
    probes, failures = {}, []
    for name in candidates:
        with cast_temporarily(model, DTYPES[name]):
            probe = probes[name] = compare(model, ids, ref_tokens, ref_logits)
        why = check(probe)
        if why is None:
            speed = f"{note}, " if note else f"{_speeds(timings, name)}, "
            return PrecisionChoice(name, "auto", speed + probe.summary(), timings, probes)
        failures.append(f"{name} failed the accuracy probe ({why})")
    return PrecisionChoice("fp32", "auto", "; ".join(failures), timings, probes)


def _speeds(timings: dict[str, float], name: str) -> str:
    ratio = timings["fp32"] / timings[name]
    if ratio >= 1:
        return f"{ratio:.1f}x faster matvec than fp32 on this CPU"
    return f"{name} matvec at {ratio:.2g}x fp32's speed on this CPU"


def cast_model(model: nn.Module, choice: PrecisionChoice | str) -> nn.Module:
    """``model`` cast in place to the chosen dtype (weights and buffers)."""
    name = choice.name if isinstance(choice, PrecisionChoice) else check_name(choice, CHOICES, "")
    return model if name == "fp32" else model.to(DTYPES[name])


def prepare_model(
    model: nn.Module,
    tokenizer=None,
    requested: str = "auto",
    cache_dir: str | Path | None = None,
    log: Callable[[str], object] | None = print,
    check: Callable[[Probe], str | None] = default_check,
    batch: int = 1,
) -> tuple[nn.Module, PrecisionChoice]:
    """Choose (see :func:`choose_dtype`) and cast: what the loaders call."""
    choice = choose_dtype(model, tokenizer, requested, None, cache_dir, log, check, batch)
    return cast_model(model, choice), choice


# --------------------------------------------------------------------------------------
# Training: bf16 autocast or not
# --------------------------------------------------------------------------------------


def train_rows(shapes: dict[str, int], tokens: int, flop_budget: float = 1.5e9) -> int:
    """Rows (tokens) of the training-shaped measurement: the micro-batch's, capped so
    one forward + backward over the distinct shapes costs about ``flop_budget``."""
    per_row = 6 * sum(math.prod(_parse(s)) for s in shapes)
    return max(1, min(tokens, 2048, max(128, int(flop_budget / per_row))))


def measure_train(shapes: dict[str, int], rows: int, repeats: int = 3) -> dict:
    """Seconds per forward + backward of every linear shape at ``rows`` tokens, fp32 and
    under bf16 autocast (fp32 master weights, as in training), interleaved, the fastest
    repeat of each."""
    mats = {s: torch.randn(*_parse(s)).mul_(0.02).requires_grad_() for s in shapes}
    xs = {s: torch.randn(rows, _parse(s)[1]).requires_grad_() for s in shapes}
    per: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in ("fp32", "bf16")}

    def once(s: str, bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.linear(xs[s], mats[s])
        y.float().sum().backward()
        return time.perf_counter() - t

    for s in shapes:
        once(s, False), once(s, True)  # warm-up
    for _ in range(repeats):
        for s in shapes:
            per["fp32"][s].append(once(s, False))
            per["bf16"][s].append(once(s, True))
    return {n: sum(shapes[s] * min(ts) for s, ts in per[n].items()) for n in per}


def choose_train_precision(
    model: nn.Module,
    tokens: int,
    device: torch.device | str,
    requested: str = "auto",
    cache_dir: str | Path | None = None,
    log: Callable[[str], object] | None = print,
) -> TrainPrecision:
    """bf16 autocast or fp32 for training ``model`` on micro-batches of ``tokens``.

    CUDA: bf16 when ``auto``. CPU: bf16 only if a forward + backward of the model's
    linear shapes at this token count measured MIN_SPEEDUP x faster than fp32 here.
    """
    requested = check_name(requested, TRAIN_CHOICES, "--precision")
    dev = torch.device(device)
    if requested != "auto":
        choice = TrainPrecision(requested, requested, "as requested")
    elif dev.type == "cuda":
        choice = TrainPrecision("bf16", requested, "GPU default: bf16 autocast")
    elif dev.type != "cpu":
        choice = TrainPrecision("fp32", requested, f"{dev.type}: fp32 (not measured)")
    else:
        shapes = linear_shapes(model)
        rows = train_rows(shapes, tokens)
        t = cached_timings(f"train-{rows}", shapes, cache_dir, lambda: measure_train(shapes, rows))
        ratio = t["fp32"] / t["bf16"]
        name = "bf16" if ratio >= MIN_SPEEDUP else "fp32"
        verdict = "bf16 autocast" if name == "bf16" else f"fp32 (bf16 < {MIN_SPEEDUP}x)"
        choice = TrainPrecision(
            name, requested,
            f"{verdict}: forward+backward of the model's matmuls at {rows} tokens "
            f"{ratio:.2f}x fp32's speed with bf16 autocast on this CPU",
            t,
        )  # fmt: skip
    if log is not None:
        log(choice.line())
    return choice
