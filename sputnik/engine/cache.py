"""Preallocated KV cache: per-layer k/v (or MLA's latent c_kv + k_pe), written at one shared slot offset."""

from __future__ import annotations

import torch
from torch import Tensor

from sputnik.config import ModelConfig


class KVCache:
    """Static cache for a batch. Row b's token at slot s is real iff valid[b, s]; padding slots are never attended.

    All rows write at the same slots (start = length), so ragged prompts are left-padded and decoding writes one
    column per step. MLA layers store only RMSNorm(c_kv) and k_pe: kv_lora_rank + qk_rope_head_dim per token.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.cfg, self.max_len = cfg, max_len
        # One tensor per layer: indexing a stacked [L, ...] tensor would cost an op per layer per step.
        def zeros(*shape: int) -> list[Tensor]:
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

        if cfg.is_mla:
            self.kv = zeros(batch, max_len, cfg.kv_lora_rank)
            self.pe = zeros(batch, max_len, cfg.qk_rope_head_dim)
        else:
            self.k = zeros(batch, cfg.n_kv_heads, max_len, cfg.head_dim)
            self.v = zeros(batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.has_pad = False
        self.length = 0

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def mark(self, attn_mask: Tensor | None) -> Tensor | None:
        """Record which of the next T tokens are real; return the key-validity mask, or None if nothing is padding."""
        if attn_mask is not None and not bool(attn_mask.all()):
            T = attn_mask.shape[1]
            self._check(T)
            self.valid[:, self.length : self.length + T] = attn_mask
            self.has_pad = True
        return self.valid if self.has_pad else None

    def _check(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] at the current slots; return all cached keys/values [B, Hkv, S, D]."""
        T = k.shape[2]
        self._check(T)
        end = self.length + T
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, self.length : end] = k
        vc[:, :, self.length : end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def update_latent(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Write MLA's c_kv [B, T, R] and k_pe [B, T, rope]; return all cached [B, S, R], [B, S, rope]."""
        T = c_kv.shape[1]
        self._check(T)
        end = self.length + T
        kv, pe = self.kv[layer], self.pe[layer]
        kv[:, self.length : end] = c_kv
        pe[:, self.length : end] = k_pe
        return kv[:, :end], pe[:, :end]

    def buffers(self) -> list[Tensor]:
        return [*self.kv, *self.pe] if self.cfg.is_mla else [*self.k, *self.v]

    def select(self, rows: Tensor) -> None:
        """Keep (or repeat) batch rows in this order: drop finished sequences, or fan one prefill out to n samples."""
        for name in ("kv", "pe") if self.cfg.is_mla else ("k", "v"):
            setattr(self, name, [t.index_select(0, rows) for t in getattr(self, name)])
        self.valid = self.valid.index_select(0, rows)
        self.has_pad = self.has_pad and not bool(self.valid[:, : self.length].all())

    def nbytes_per_token(self) -> int:
        return sum(b[0, ..., 0, :].numel() * b.element_size() for b in self.buffers())
