"""Preallocated KV caches: per-layer k/v (or MLA's latent c_kv + k_pe).

A cache may keep a narrower dtype than the model computes in (Engine's kv_dtype: bfloat16 halves a float32 model's
cache): values are rounded as they are written and widened as they are read, so attention sees what the cache holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sputnik.config import ModelConfig
from sputnik.model import build_mask


class KVCache:
    """Static cache for a batch of equal-length rows (a sputnik.model.Cache), written at one shared slot offset: the
    engine prefills each prompt in a one-row KVCache. MLA layers store only RMSNorm(c_kv) and k_pe:
    kv_lora_rank + qk_rope_head_dim per token.
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
        self.batch, self.device = batch, device
        self.length = 0

    def positions(self, T: int) -> Tensor:
        return torch.arange(self.length, self.length + T, device=self.device).expand(self.batch, T)

    def mask(self, T: int) -> Tensor | None:
        """The next T tokens' attention mask over the slots so far: causal."""
        return build_mask(self.batch, T, self.length, None, self.device)

    def advance(self, T: int) -> None:
        self.length += T

    def row(self, r: int) -> list[Tensor]:
        """Row r's filled slots, [1, ..., len, ...] per buffer per layer, as SlotCache.add takes them."""
        return [t[r : r + 1, : self.length] if t.dim() == 3 else t[r : r + 1, :, : self.length]
                for t in self.buffers()]

    def load_prefix(self, tensors: list[Tensor]) -> None:
        """Start this (one-row) cache from a cached prefix: tensors as from row()."""
        n = tensors[0].shape[-2]
        self._check(n)
        for buf, t in zip(self.buffers(), tensors):
            (buf[:, :n] if buf.dim() == 3 else buf[:, :, :n]).copy_(t)
        self.length = n

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
        return kc[:, :, :end].to(k.dtype), vc[:, :, :end].to(v.dtype)

    def update_latent(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Write MLA's c_kv [B, T, R] and k_pe [B, T, rope]; return all cached [B, S, R], [B, S, rope]."""
        T = c_kv.shape[1]
        self._check(T)
        end = self.length + T
        kv, pe = self.kv[layer], self.pe[layer]
        kv[:, self.length : end] = c_kv
        pe[:, self.length : end] = k_pe
        return kv[:, :end].to(c_kv.dtype), pe[:, :end].to(k_pe.dtype)

    def buffers(self) -> list[Tensor]:
        return [*self.kv, *self.pe] if self.cfg.is_mla else [*self.k, *self.v]

    def nbytes_per_token(self) -> int:
        return sum(b[0, ..., 0, :].numel() * b.element_size() for b in self.buffers())


class SlotCache:
    """A pool of rows for continuous batching: rows [0, n) each hold one sequence at its own length.

    Decoding writes row b's new token at slot lens[b] and attends to slots <= lens[b], so sequences of any length
    share a step. Finished rows are refilled by moving the last row into them; buffers grow by doubling.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, rows: int = 1,
                 max_len: int = 128):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.names = ("kv", "pe") if cfg.is_mla else ("k", "v")
        self.n = 0
        self.host_lens: list[int] = []
        self.rows, self.max_len = 0, 0
        self._alloc(rows, max_len)

    def _shape(self, name: str, rows: int, length: int) -> tuple[int, ...]:
        cfg = self.cfg
        if name == "kv":
            return rows, length, cfg.kv_lora_rank
        if name == "pe":
            return rows, length, cfg.qk_rope_head_dim
        return rows, cfg.n_kv_heads, length, cfg.head_dim

    def _alloc(self, rows: int, length: int) -> None:
        length = min(length, self.cfg.max_seq_len)
        for name in self.names:
            with torch.inference_mode(False):  # always plain tensors, wherever they grow: a compiled step sees one kind
                new = [torch.zeros(self._shape(name, rows, length), dtype=self.dtype, device=self.device)
                       for _ in range(self.cfg.n_layers)]
            for old, t in zip(getattr(self, name, []), new):
                self._slots(t, 0, self.n)[..., : self.max_len, :].copy_(self._slots(old, 0, self.n))
            setattr(self, name, new)
        self.rows, self.max_len = rows, length

    def _slots(self, t: Tensor, start: int, end: int, length: int | None = None) -> Tensor:
        """Rows [start, end) of one buffer, slots [0, length)."""
        t = t[start:end]
        return t if length is None else (t[:, :length] if t.dim() == 3 else t[:, :, :length])

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` rows of `length` slots (doubling, so growth is rare)."""
        if rows > self.rows or length > self.max_len:
            self._alloc(max(rows, self.rows * (2 if rows > self.rows else 1)),
                        max(length, self.max_len * (2 if length > self.max_len else 1)))

    def add(self, tensors: list[Tensor], count: int = 1) -> None:
        """Append `count` rows holding the same sequence; tensors: one per buffer per layer, as from `row()`."""
        length = tensors[0].shape[-2]
        self.reserve(self.n + count, length + 1)
        bufs = self.buffers()
        for buf, t in zip(bufs, tensors):
            self._slots(buf, self.n, self.n + count, length).copy_(t.expand(count, *t.shape[1:]))
        self.n += count
        self.host_lens += [length] * count

    def row(self, r: int) -> list[Tensor]:
        """Row r's cached slots, [1, ..., len, ...] per buffer per layer (views, not copies)."""
        return [self._slots(buf, r, r + 1, self.host_lens[r]) for buf in self.buffers()]

    def remove(self, rows: list[int]) -> list[int]:
        """Free these rows by moving the last rows into them; return the old index of each remaining row."""
        order = list(range(self.n))
        for r in sorted(rows, reverse=True):
            last = self.n - 1
            if r != last:
                length = self.host_lens[last]
                for buf in self.buffers():
                    self._slots(buf, r, r + 1, length).copy_(self._slots(buf, last, last + 1, length))
                self.host_lens[r], order[r] = length, order[last]
            self.host_lens.pop()
            order.pop()
            self.n -= 1
        return order

    def buffers(self) -> list[Tensor]:
        return [t for name in self.names for t in getattr(self, name)]

    def view(self, full: bool = False) -> SlotView:
        """This step's view (a sputnik.model.Cache): row b writes its new token at slot host_lens[b].

        Eager steps attend to the slots any row has filled (no mask for a lone row: SDPA's fastest path); a compiled
        step (full) attends to every slot under a mask, so its shapes change only when the buffers grow."""
        self.reserve(self.n, max(self.host_lens) + 1)
        lens = torch.tensor(self.host_lens, device=self.device)
        S = self.max_len if full else max(self.host_lens) + 1
        return SlotView(self.buffers(), lens, S, masked=full or self.n > 1)

    def advance(self, T: int) -> None:
        self.host_lens = [n + T for n in self.host_lens]


class SlotView:
    """One decode step over rows [0, n) of a SlotCache's buffers: row b writes its token at slot lens[b] and attends
    to slots <= lens[b] among the first S. Tensors and sizes only, so a compiled step traces it whole."""

    def __init__(self, buffers: list[Tensor], lens: Tensor, S: int, masked: bool = True):
        half = len(buffers) // 2
        self.buffers = buffers
        self.first, self.second = buffers[:half], buffers[half:]  # k and v, or MLA's c_kv and k_pe
        self.lens, self.S, self.masked = lens, S, masked
        self.rows = torch.arange(lens.shape[0], device=lens.device)

    def positions(self, T: int) -> Tensor:
        return self.lens[:, None]

    def mask(self, T: int) -> Tensor | None:
        if T != 1:
            raise ValueError("a SlotCache decodes one token per row; prefill into a KVCache first")
        if not self.masked:
            return None
        mask = torch.arange(self.S, device=self.lens.device)[None] <= self.lens[:, None]
        return mask[:, None, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kc, vc, n = self.first[layer], self.second[layer], self.lens.shape[0]
        kc[self.rows, :, self.lens] = k[:, :, 0].to(kc.dtype)
        vc[self.rows, :, self.lens] = v[:, :, 0].to(vc.dtype)
        return kc[:n, :, : self.S].to(k.dtype), vc[:n, :, : self.S].to(v.dtype)

    def update_latent(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        kv, pe, n = self.first[layer], self.second[layer], self.lens.shape[0]
        kv[self.rows, self.lens] = c_kv[:, 0].to(kv.dtype)
        pe[self.rows, self.lens] = k_pe[:, 0].to(pe.dtype)
        return kv[:n, : self.S].to(c_kv.dtype), pe[:n, : self.S].to(k_pe.dtype)

    def advance(self, T: int) -> None:
        pass  # the SlotCache advances its host-side lengths after the step
