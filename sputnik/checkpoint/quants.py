"""Float rows to GGUF block bytes: Q8_0 and Q4_1 in torch (bit for bit the `gguf` package's reference quantizers, at
torch's speed: GRPO quantizes its policy after every update), our own Q4_K (which `gguf` can only read), and the
`gguf` package's quantizers for the other types.

Q4_K, from the format's definition (ggml's block_q4_K): super-blocks of 256 values in 8 sub-blocks of 32; each
sub-block j holds 4-bit codes q and decodes as d * sc[j] * q - dmin * m[j], with 6-bit sc[j], m[j] and the two
fp16 super-block scales d, dmin. Bytes: d, dmin (fp16 each), 12 bytes packing the 6-bit sc/m, then 128 bytes of
nibbles (bytes 32c..32c+31 hold sub-block 2c in their low nibbles and 2c+1 in their high ones).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from torch import Tensor

QK_K = 256
# Candidate code ranges tried per sub-block (the range [min, max] is stretched by (15 + r) / 15): a small search
# over the rounding grid, each candidate refit by least squares, the best kept.
_STRETCH = np.linspace(-1.0, 1.0, 21)


def quantize_rows(x: np.ndarray, type_name: str) -> np.ndarray:
    """Rows [..., K] of float32 as block bytes [..., K / block * bytes] (uint8) of a GGUF type named like "Q8_0"."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if type_name in _TORCH:
        return quantize_tensor(torch.from_numpy(x), type_name).numpy()
    if type_name == "Q4_K":
        return quantize_q4_k(x)
    return gguf_quantize(x, GGMLQuantizationType[type_name])


def quantize_tensor(t: Tensor, type_name: str) -> Tensor:
    """quantize_rows for a tensor (any float dtype or device; the bytes come back on the CPU)."""
    if type_name not in _TORCH:
        return torch.from_numpy(quantize_rows(t.detach().float().cpu().numpy(), type_name))
    if t.shape[-1] % 32:
        raise ValueError(f"{type_name} rows need a multiple of 32 values, got {t.shape[-1]}")
    blocks = t.detach().reshape(-1, 32)
    chunk = 1 << 16  # blocks at a time: a few MB of temporaries
    out = torch.cat([_TORCH[type_name](blocks[i : i + chunk].float().cpu()) for i in range(0, len(blocks), chunk)])
    return out.reshape(*t.shape[:-1], -1)


def _roundf(v: Tensor) -> Tensor:
    """C's roundf (halves away from zero), computed as ggml's reference quantizer computes it."""
    a = v.abs()
    whole = a.floor()
    return v.sign() * (whole + (2 * (a - whole)).floor())


def _q8_0(x: Tensor) -> Tensor:
    """Blocks [n, 32] -> Q8_0 bytes [n, 34]: the scale d = max |x| / 127 (stored fp16), then roundf(x / d)."""
    d = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1 / d)
    q = _roundf(x * inv).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], 1)


def _q4_1(x: Tensor) -> Tensor:
    """Blocks [n, 32] -> Q4_1 bytes [n, 20]: d = (max - min) / 15 and m = min (fp16 each), then 4-bit codes
    trunc((x - min) / d + 0.5), element j in the low nibble of byte j and element j + 16 in its high one."""
    hi, lo = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, 0.0, 1 / d)
    q = ((x - lo) * inv + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), lo.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], 1)


_TORCH = {"Q8_0": _q8_0, "Q4_1": _q4_1}


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows [..., K] (K a multiple of 256) as Q4_K blocks [..., K / 256 * 144] (uint8)."""
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q4_K rows need a multiple of {QK_K} values, got {x.shape[-1]}")
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    scale, offset = _fit_subblocks(sub)  # value ≈ scale * q - offset, scale >= 0, offset >= 0
    d = scale.max(-1) / 63
    dmin = offset.max(-1) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = _codes(scale, d16.astype(np.float32)[:, None], 63)
    m = _codes(offset, dmin16.astype(np.float32)[:, None], 63)
    eff_scale = d16.astype(np.float32)[:, None] * sc  # what the decoder will use
    eff_offset = dmin16.astype(np.float32)[:, None] * m
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff_scale[..., None] > 0, np.rint((sub + eff_offset[..., None]) / eff_scale[..., None]), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)  # [n, 8, 32]

    n = sub.shape[0]
    out = np.empty((n, 144), dtype=np.uint8)
    out[:, 0:2] = d16.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin16.reshape(n, 1).view(np.uint8)
    out[:, 4:16] = _pack_scales(sc.astype(np.uint8), m.astype(np.uint8))
    out[:, 16:] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


def _codes(values: np.ndarray, step: np.ndarray, top: int) -> np.ndarray:
    """round(values / step) in [0, top] (0 where step is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.where(step > 0, np.rint(values / step), 0), 0, top).astype(np.float32)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [n, 8] in Q4_K's 12 bytes: bytes 0-3 and 4-7 hold sc/m 0-3 in their low 6 bits and
    the top 2 bits of sc/m 4-7 in their high 2; bytes 8-11 hold the low 4 bits of sc 4-7 (low nibble) and m 4-7."""
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return packed


def _fit_subblocks(sub: np.ndarray, nmax: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block of 32 values, (scale, offset) >= 0 with value ≈ scale * q - offset, q in 0..nmax: the rounding
    grid of each stretched candidate range, refit by least squares (the offset may not go below zero: Q4_K's
    minimum is never positive), the candidate with the smallest squared error kept."""
    lo = np.minimum(sub.min(-1), 0)
    hi = sub.max(-1)
    span = hi - lo
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale = np.where(span > 0, span / nmax, 0).astype(np.float32)
    best_offset = -lo
    for r in _STRETCH:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(span > 0, (nmax + r) / span, 0)
        q = np.clip(np.rint((sub - lo[..., None]) * inv[..., None]), 0, nmax)
        scale, offset = _least_squares(sub, q)
        err = ((scale[..., None] * q - offset[..., None] - sub) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, offset, best_offset)
    return best_scale, best_offset


def _least_squares(x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) minimizing sum (scale * q - offset - x)^2 per row, offset clamped to >= 0 (then scale refit).
    Where every q is the same (a constant row) only scale * q - offset = mean(x) is fixed: the offset takes what a
    negative mean needs."""
    n = x.shape[-1]
    sq, sx, sqq, sqx = q.sum(-1), x.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
    det = n * sqq - sq * sq
    flat = det <= 1e-9 * np.maximum(n * sqq, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (n * sqx - sq * sx) / det
        offset = (sq * sqx - sqq * sx) / det  # = scale * mean(q) - mean(x)
        offset = np.where(flat, np.maximum(-sx / n, 0), offset)
        offset = np.maximum(offset, 0)
        refit = flat | (offset == 0)
        scale = np.where(refit, np.where(sqq > 0, (sqx + offset * sq) / sqq, 0), scale)
    return np.maximum(scale, 0).astype(np.float32), offset.astype(np.float32)
