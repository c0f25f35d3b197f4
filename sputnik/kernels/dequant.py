"""GGUF block formats decoded by torch operators, on whatever device holds the blocks: the GPU path of the block
layers (the C++ kernels are CPU-only). Each block type's layout is ggml's; the results equal the C++ kernels' and
the `gguf` package's, bit for bit."""

from __future__ import annotations

import torch
from torch import Tensor


def _f16(raw: Tensor) -> Tensor:
    """Little-endian fp16 fields [..., 2] (uint8) -> float32 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [..., n] -> their low nibbles then their high nibbles [..., 2n] (ggml's order within a 32-value run)."""
    return torch.cat([qs & 0xF, qs >> 4], -1)


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b[..., 0:2])[..., None] * b[..., 2:34].view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[..., 0:2])[..., None] * (_nibbles(b[..., 2:18]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b[..., 0:2])[..., None] * _nibbles(b[..., 4:20]).float() + _f16(b[..., 2:4])[..., None]


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in a K-quant block's 12 bytes [..., 12] -> two [..., 8] (as floats)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], -1)
    mins = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], -1)
    return scales.float(), mins.float()


def _k_quant(b: Tensor, q: Tensor) -> Tensor:
    """Q4_K / Q5_K: 8 runs of 32 values [..., 8, 32] -> d * scale * q - dmin * min."""
    scales, mins = _scale_min_k4(b[..., 4:16])
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    return (d * scales)[..., None] * q.float() - (dmin * mins)[..., None]


def _q4_k(b: Tensor) -> Tensor:
    # 4 chunks of 32 bytes: each chunk's low nibbles are one run of 32 values, its high nibbles the next
    qs = b[..., 16:144].unflatten(-1, (4, 32))
    return _k_quant(b, torch.stack([qs & 0xF, qs >> 4], -2).flatten(-3, -2))


def _q5_k(b: Tensor) -> Tensor:
    qh, qs = b[..., 16:48], b[..., 48:176].unflatten(-1, (4, 32))
    low = torch.stack([qs & 0xF, qs >> 4], -2).flatten(-3, -2)  # [..., 8, 32]
    bit = torch.arange(8, device=b.device, dtype=torch.uint8)  # run j's fifth bits are bit j of qh's 32 bytes
    high = (qh[..., None, :] >> bit[:, None]) & 1
    return _k_quant(b, low | (high << 4))


def _q6_k(b: Tensor) -> Tensor:
    ql, qh = b[..., 0:128].unflatten(-1, (2, 2, 32)), b[..., 128:192].unflatten(-1, (2, 32))
    scales = b[..., 192:208].view(torch.int8).float().unflatten(-1, (2, 4, 2))  # [half, run of 32, 16 values each]
    d = _f16(b[..., 208:210])
    low = torch.stack([ql & 0xF, ql >> 4], -3)  # [..., half, nibble, 2, 32]: runs in the order nibble * 2 + i
    shift = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(2, 2, 1)  # run r takes bits 2r of qh
    high = (qh[..., None, None, :] >> shift) & 3
    q = (low | (high << 4)).flatten(-3, -2).float() - 32  # [..., half, 4 runs, 32]
    return (d[..., None, None, None, None] * scales[..., None] * q.unflatten(-1, (2, 16))).flatten(-4)


DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize_blocks(qweight: Tensor, name: str, block: int, size: int, in_features: int) -> Tensor:
    """Rows of `name` blocks [M, bytes] (uint8) -> float32 [M, in_features], on qweight's device."""
    if name in FLOATS:
        return qweight.contiguous().view(FLOATS[name]).float().view(-1, in_features)
    rows = qweight.reshape(qweight.shape[0], in_features // block, size)
    return DECODERS[name](rows).reshape(qweight.shape[0], in_features)
