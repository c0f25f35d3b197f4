"""What a run or benchmark ran on: the CPU model and the instruction-set flags that decide its kernels, so every
figure carries its machine (figures from different machines do not compare)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

# The flags that change which matmul / attention kernels run (or how fast) on an x86 CPU.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
                "amx_tile")


def describe() -> dict:
    """{"cpu", "flags", "cpus", "torch_threads", "torch", "date"} of this process's machine."""
    cpu, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:  # every core repeats it: the first will do
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform string is all there is
        pass
    cpu = cpu or platform.processor() or platform.machine()
    return {"cpu": cpu, "flags": [f for f in KERNEL_FLAGS if f in flags], "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def line(m: dict | None = None) -> str:
    """The machine as one printed line."""
    m = m or describe()
    gpu = f", {m['cuda']}" if m["cuda"] else ""
    return (f"machine: {m['cpu']} ({' '.join(m['flags']) or 'no AVX2'}), {m['cpus']} cpus, {m['torch_threads']} torch "
            f"threads, torch {m['torch']}{gpu}; {m['date']}")
