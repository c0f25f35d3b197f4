"""Prefix cache: the KV of recent prompts (and finished conversations), so a prompt that starts the same way skips
recomputing the shared part: a system prompt, few-shot examples, or a chat's earlier turns."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch import Tensor

# Shorter matches are not worth a copy and a separate prefill group.
MIN_MATCH = 16


class PrefixCache:
    """An LRU of token sequences and their cached KV (one tensor per buffer per layer), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[Tensor], int]] = OrderedDict()

    def lookup(self, ids: list[int], align: int = 1) -> list[Tensor] | None:
        """KV of the longest cached prefix of ids (at most len(ids) - 1 tokens: the last one must be computed to get
        logits), cut to a multiple of `align` tokens, or None when that is shorter than MIN_MATCH."""
        query = np.asarray(ids, dtype=np.int64)
        best, best_key = 0, None
        for key, (arr, _, _) in self.entries.items():
            n = min(len(arr), len(query) - 1)
            if n <= best:
                continue
            diff = np.nonzero(arr[:n] != query[:n])[0]
            m = int(diff[0]) if len(diff) else n
            if m > best:
                best, best_key = m, key
        best -= best % align
        if best < MIN_MATCH or best_key is None:
            return None
        self.entries.move_to_end(best_key)
        kv = self.entries[best_key][1]
        return [t[..., :best, :] if t.dim() == 3 else t[:, :, :best] for t in kv]

    def store(self, ids: list[int], kv: list[Tensor]) -> None:
        """Keep a copy of kv (the cache rows of ids, [1, ..., len(ids), ...]) unless it is too short or too big.
        Entries that are prefixes of ids go: the new one answers every lookup they would (a chat's earlier turns,
        a multi-turn rollout's before its tool result), and each would hold its memory for nothing."""
        key = tuple(ids)
        if len(ids) < MIN_MATCH or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        size = sum(t.numel() * t.element_size() for t in kv)
        if size > self.max_bytes:
            return
        query = np.asarray(ids, dtype=np.int64)
        for old in [k for k, (arr, _, _) in self.entries.items()
                    if len(arr) < len(query) and np.array_equal(arr, query[: len(arr)])]:
            self.bytes -= self.entries.pop(old)[2]
        while self.bytes + size > self.max_bytes and self.entries:
            _, (_, _, freed) = self.entries.popitem(last=False)
            self.bytes -= freed
        self.entries[key] = (np.asarray(ids, dtype=np.int64), [t.clone() for t in kv], size)
        self.bytes += size
