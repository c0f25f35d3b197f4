"""Which device and dtype a command runs on when the user says "auto"."""

from __future__ import annotations

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # names, so the CLI can list them without importing torch


def pick_device(name: str = "auto") -> str:
    """"auto": the GPU when there is one, else the CPU; any other name is returned as is."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def fast_bf16(device: str) -> bool:
    """Does this device multiply bf16 matrices natively (a GPU with bf16, a CPU with AMX tiles)?"""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe and probe())
    return False


def pick_dtype(name: str, device: str):
    """A torch dtype by name; "auto" is bf16 where the device multiplies it natively (half the weight bytes, and on
    AMX CPUs batched decoding about twice as fast as fp32), fp32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])
