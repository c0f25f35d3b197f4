"""Which device and dtype a command runs on when the user says "auto"; giving freed memory back after a load."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # names, so the CLI can list them without importing torch


def pick_device(name: str = "auto") -> str:
    """"auto": the GPU when there is one, else the CPU; any other name is returned as is."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# CPU flags (as /proc/cpuinfo spells them) whose instructions multiply bf16 natively: AVX512-BF16's dot products
# (Zen 4+, Cooper Lake+) and AMX tiles (Sapphire Rapids+). On such CPUs bf16 matmuls run about twice as fast as fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_bf16(device: str, flags: set[str] | None = None) -> bool:
    """Does this device multiply bf16 matrices natively (a GPU with bf16; a CPU with AVX512-BF16 or AMX)?
    flags: the CPU's flags (default: this machine's)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        if flags is None:
            flags = cpu_flags()
            if not flags:  # no /proc/cpuinfo: ask torch about AMX
                probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
                return bool(probe and probe())
        return any(f in flags for f in BF16_CPU_FLAGS)
    return False


def pick_dtype(name: str, device: str, flags: set[str] | None = None):
    """A torch dtype by name; "auto" is bf16 where the device multiplies it natively (half the weight bytes, and
    batched decoding about twice as fast as fp32), fp32 elsewhere. flags: as for fast_bf16."""
    import torch

    if name == "auto":
        return torch.bfloat16 if fast_bf16(device, flags) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim), a loader's last step: parsing a file and
    building a model or a tokenizer free megabytes of temporaries whose pages would otherwise stay in the process's
    resident memory. Nothing where the C library is not glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
