"""A GGUF file's header read into plain Python values, and its tensors as views of one read-only memory map.

The layout is llama.cpp's GGUF (versions 2 and 3, little-endian): magic, version, tensor and metadata counts; the
metadata as (key, type, value); the tensor infos as (name, dims fastest-first, ggml type, offset); then the data,
aligned to `general.alignment` (32 by default). The `gguf` package's GGUFReader keeps a numpy array for every part of
every value, which for a 49k-token vocabulary is ~150 MB and seconds of parsing; this reader keeps lists and strings
(a few MB, a fraction of a second), so a loaded model's memory is about its file's size.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    import torch

# ggml tensor type id -> (elements per block, bytes per block), as the gguf package (0.19) lists them: enough to
# size and skip any tensor of a file (what the kernels multiply is sputnik.kernels.TYPES). Kept here rather than
# imported from the `gguf` package, whose import costs a loaded model ~2 MB of memory for this one table.
GGML_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),  # F32 .. Q8_1
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),  # Q2_K .. Q8_K
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),  # .. BF16
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),  # TQ1_0, TQ2_0, MXFP4, ...
}

# GGUF metadata value types -> struct formats (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, FLOAT32 = 8, 9, 6


@dataclass
class GGUFTensor:
    """One tensor's info and raw bytes (uint8, a view of the file's map): dims fastest-first, as GGUF lists them."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]
    n_elements: int
    data: np.ndarray = field(repr=False)


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata by key (float32 scalars in their short decimal form) and its tensors in order."""

    path: Path
    version: int
    fields: dict[str, Any] = field(repr=False)  # a vocabulary is 100k strings
    tensors: list[GGUFTensor] = field(repr=False)
    mapped: mmap.mmap | None = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def keep_resident(self, views: Iterable["torch.Tensor"]) -> None:
        """Let the kernel take back the map's pages that no view in `views` covers: the tensors a loader copied (and
        read once) and the header. Resident file pages count in a process's RSS; dropped ones are read again from the
        page cache only if touched, so this is safe for any view a caller forgot."""
        if self.mapped is None:
            return
        base, size = np.frombuffer(self.mapped, dtype=np.uint8).ctypes.data, len(self.mapped)
        kept = sorted((v.data_ptr() - base, v.data_ptr() - base + v.nbytes) for v in views
                      if 0 <= v.data_ptr() - base < size)
        start = 0
        for lo, hi in kept + [(size, size)]:
            _drop_pages(self.mapped, start, lo)
            start = max(start, hi)


def _drop_pages(mapped: mmap.mmap, start: int, end: int) -> None:
    """MADV_DONTNEED on the whole pages inside [start, end) of a read-only map."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):  # Windows' mmap has no madvise
        mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class StringArray(Sequence[str]):
    """A long GGUF array of strings (a vocabulary, its merges) kept as its bytes and decoded item by item when read.

    100k small str objects, parsed with the header and freed after the tokenizer is built, leave the allocator's
    arenas pinned by whatever the model loader allocated in between (~5 MB of a loaded model's memory); one bytes
    object is freed whole."""

    MIN = 1024  # shorter arrays are plain lists

    def __init__(self, blob: bytes, starts: array):
        self._blob, self._starts = blob, starts  # starts[i]: where item i's 8-byte length is

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError("StringArray index out of range")
        index %= len(self)
        end = self._starts[index + 1] if index + 1 < len(self) else len(self._blob)
        return self._blob[self._starts[index] + 8 : end].decode("utf-8", errors="replace")

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # a sequence compared by value, like the list it stands for


class _Cursor:
    """Sequential little-endian reads from a buffer; a read past its end is a truncated file."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"truncated at byte {self.pos}")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def strings(self, n: int) -> "StringArray":
        start, starts = self.pos, array("q", bytes(8 * n))
        for i in range(n):
            starts[i] = self.pos - start
            self.pos += 8
            if self.pos > len(self.buf):
                raise ValueError(f"truncated at byte {self.pos}")
            self.pos += struct.unpack_from("<Q", self.buf, self.pos - 8)[0]
        if self.pos > len(self.buf):
            raise ValueError(f"truncated at byte {self.pos}")
        return StringArray(bytes(self.buf[start : self.pos]), starts)

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, n = self.take("I"), self.take("Q")
            if item in _SCALARS:  # numbers in one read
                fmt = _SCALARS[item]
                size = struct.calcsize(fmt) * n
                if self.pos + size > len(self.buf):
                    raise ValueError(f"truncated at byte {self.pos}")
                values = list(struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos))
                self.pos += size
                return values
            if item == STRING and n >= StringArray.MIN:
                return self.strings(n)
            return [self.value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")
        value = self.take(_SCALARS[kind])
        return float(str(np.float32(value))) if kind == FLOAT32 else value  # 1e-05, not 9.999999747378752e-06


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (ValueError when it is not one, is truncated, or names a type this reader cannot size)."""
    file = Path(path)
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while a tensor view refers to it
    cur = _Cursor(mapped)
    if len(mapped) < 24 or mapped[:4] != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; a big-endian file reads as huge)")
    n_tensors, n_fields = cur.take("Q"), cur.take("Q")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    data = np.frombuffer(mapped, dtype=np.uint8)
    tensors = []
    for name, dims, kind, offset in infos:
        if kind not in GGML_SIZES:
            raise ValueError(f"tensor {name!r} has unknown ggml type {kind}")
        block, size = GGML_SIZES[kind]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        nbytes = n // block * size
        if start + offset + nbytes > len(mapped):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated)")
        tensors.append(GGUFTensor(name, kind, dims, n, data[start + offset : start + offset + nbytes]))
    _drop_pages(mapped, 0, start)  # the header is Python values now
    return GGUFFile(file, version, fields, tensors, mapped)
