"""What machine a benchmark ran on: every script prints this line first.

CPU matmul speed depends on the SIMD/matrix extensions (AVX2 vs AVX-512 with BF16/VNNI vs
AMX), so figures are only comparable between machines with the same line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile")


def describe() -> str:
    """CPU model, the extensions that matter, torch's dispatch level, threads, cores."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in FLAGS)
    return (
        f"machine: {model}; {have}; torch {torch.__version__} capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores"
        + (f"; cuda {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
