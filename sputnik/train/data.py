"""Token shards for pretraining: documents tokenized once into flat memmapped uint16/uint32 files, EOS between them.

A shard folder holds shard_NNNNN.bin files and index.json (dtype, tokens per shard, documents, eos id). Training
reads windows of seq_len + 1 tokens at random offsets (seeded per step), so any number of epochs costs no copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shards(docs: Iterable[list[int]], out: str | Path, vocab_size: int, eos_id: int,
                 shard_tokens: int = 1 << 24) -> dict:
    """Write token lists as shards, each document followed by eos; returns the index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard_*.bin"):
        old.unlink()
    dtype = token_dtype(vocab_size)
    buf: list[np.ndarray] = []
    filled, sizes, n_docs = 0, [], 0

    def flush() -> None:
        nonlocal buf, filled
        if filled:
            np.concatenate(buf).astype(dtype).tofile(out / f"shard_{len(sizes):05d}.bin")
            sizes.append(filled)
            buf, filled = [], 0

    for doc in docs:
        arr = np.asarray(list(doc) + [eos_id], dtype=np.int64)
        if arr.size and (arr.max() >= vocab_size or arr.min() < 0):
            raise ValueError(f"token id out of range for a vocabulary of {vocab_size} in document {n_docs}")
        buf.append(arr)
        filled += arr.size
        n_docs += 1
        if filled >= shard_tokens:
            flush()
    flush()
    index = {"dtype": dtype.name, "shard_tokens": sizes, "documents": n_docs, "eos_id": eos_id,
             "vocab_size": vocab_size}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


class TokenShards:
    """All shards of a folder as one memmapped token stream."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: not a token shard folder (write one with write_shards)")
        self.index = json.loads(index_path.read_text())
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.path / f"shard_{i:05d}.bin", dtype=dtype, mode="r", shape=(n,))
                       for i, n in enumerate(self.index["shard_tokens"])]
        self.eos_id = int(self.index["eos_id"])
        self.tokens = sum(self.index["shard_tokens"])

    def windows(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """n windows of `length` tokens at random offsets (a shard chosen by its size), as int64 [n, length]."""
        sizes = np.array([len(s) for s in self.shards], dtype=np.float64)
        usable = np.maximum(sizes - length, 0)
        if usable.sum() == 0:
            raise ValueError(f"{self.path}: no shard holds {length} tokens; use a shorter seq_len or more data")
        which = rng.choice(len(self.shards), size=n, p=usable / usable.sum())
        out = np.empty((n, length), dtype=np.int64)
        for i, w in enumerate(which):
            start = int(rng.integers(0, usable[w] + 1))
            out[i] = self.shards[w][start : start + length]
        return out


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """[B, T] document index of each token (an EOS closes its document), and positions restarting per document."""
    ends = tokens == eos_id
    doc = np.zeros_like(tokens)
    doc[:, 1:] = np.cumsum(ends[:, :-1], axis=1)
    return doc


def document_positions(doc: np.ndarray) -> np.ndarray:
    """Position of each token inside its document (0 at each document's first token)."""
    T = doc.shape[1]
    idx = np.broadcast_to(np.arange(T), doc.shape)
    starts = np.zeros_like(doc)
    change = np.ones_like(doc, dtype=bool)
    change[:, 1:] = doc[:, 1:] != doc[:, :-1]
    starts = np.where(change, idx, 0)
    starts = np.maximum.accumulate(starts, axis=1)
    return idx - starts
