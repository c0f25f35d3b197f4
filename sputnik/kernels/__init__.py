"""Linear layers whose weights stay in GGUF's block formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16).

On CPUs the products run in a C++ extension (quant.cpp beside this file) that torch's cpp_extension compiles with
g++ on first use and caches (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions): Q4_0/Q4_1/Q8_0 as
integer dot products against activations quantized to 8 bits per block of 32 (llama.cpp's scheme; AVX2, with VNNI's
one-instruction dot products where the CPU has them, 16 rows to a zmm with AVX-512), the other types by decoding one
row at a time. Elsewhere (no compiler, a GPU) a layer dequantizes once with the `gguf` package and keeps the dense
weight, which is correct but not small.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ggml type id -> (name, elements per block, bytes per block): the types the kernels multiply.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
TYPE_IDS = {name: t for t, (name, _, _) in TYPES.items()}
# The C++ code paths, each needing the one before: the best one the CPU runs is the default. "vnni": AVX2's panels
# with VNNI's one-instruction u8 x s8 dot products (AVX512-VNNI + AVX512-VL or AVX-VNNI); "avx512": 16 rows to a zmm
# (AVX512-VNNI + AVX512-BW). Each computes a block's integer dot product exactly and scales it the same way, so the
# three give the same results, bit for bit.
PATHS = {"portable": 0, "avx2": 1, "vnni": 2, "avx512": 3}

_lock = threading.Lock()
_ext = None
_ext_error: str | None = None


def extension():
    """The compiled kernels, built on first use; None (with a warning, once) where they cannot be built."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is None and _ext_error is None:
            if os.environ.get("SPUTNIK_NO_KERNELS") == "1":
                _ext_error = "SPUTNIK_NO_KERNELS=1"
                return None
            try:
                _ext = _build()
            except Exception as err:  # no compiler, no headers: the dense fallback still works
                _ext_error = f"{type(err).__name__}: {err}"
                warnings.warn(f"sputnik: quantized CPU kernels unavailable ({_ext_error}); dequantizing instead",
                              stacklevel=2)
    return _ext


SOURCES = ("quant.cpp", "decode.cpp", "quant.h")


def build_dir(sources: Path | None = None) -> Path:
    """Where the kernels are compiled: one folder per Python and torch version (an extension is built for both) and
    per version of the sources and flags, so that two checkouts of different kernels never rebuild over each other's
    library (one may be loaded in a running process)."""
    import hashlib

    from torch import _appdirs

    here = sources or Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in SOURCES) + " ".join(CFLAGS).encode())
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    # torch.utils.cpp_extension's default build root, named without importing it (it imports setuptools: ~4 MB)
    root = _appdirs.user_cache_dir(appname="torch_extensions")
    return Path(os.path.realpath(root)) / tag / f"sputnik_quant_{digest.hexdigest()[:12]}"


# -fopenmp at compile time only: the OpenMP calls then bind to torch's own libgomp (one thread pool)
CFLAGS = ("-O3", "-fopenmp")
BUILT = "sputnik_quant.built"  # written once a build has finished: later processes import the library directly


def _build():
    """Import the finished build of quant.cpp, or compile it first, one process at a time.

    torch marks a build in progress with a plain `lock` file and waits while it exists, so a build that was killed
    (Ctrl-C, a CI timeout) made every later process wait forever. Builds here take an OS lock instead, which dies with
    its holder; whoever holds it knows any `lock` file left in the build directory is stale.
    """
    build = build_dir()
    library = build / "sputnik_quant.so"
    if (build / BUILT).exists() and library.exists():
        return _import(library)
    from filelock import FileLock
    from torch.utils.cpp_extension import load

    build.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build / "build.flock")):
        (build / "lock").unlink(missing_ok=True)
        here = Path(__file__).parent
        # Half a minute and more of silence otherwise, at the first chat, eval or server start after an install
        print(f"sputnik: compiling the CPU kernels into {build} (once per version of them, ~30 s on 2 cores)",
              file=sys.stderr, flush=True)
        ext = load("sputnik_quant", [str(here / name) for name in SOURCES if name.endswith(".cpp")],
                   extra_cflags=list(CFLAGS), extra_include_paths=[str(here)], build_directory=str(build),
                   verbose=False)
        (build / BUILT).touch()
        return ext


def _import(library: Path):
    """Import a built extension module as torch's loader does, without its up-to-date check (ninja, setuptools)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sputnik_quant", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> bool:
    """Can this machine multiply block-format weights on the CPU without dequantizing them?"""
    return extension() is not None


def cpu_paths() -> list[str]:
    """The kernel paths this CPU runs, portable first."""
    ext = extension()
    if ext is None:
        return []
    return [name for name, n in PATHS.items() if n <= ext.best_path()]


def row_bytes(qtype: int, in_features: int) -> int:
    name, block, size = TYPES[qtype]
    if in_features % block:
        raise ValueError(f"{name} rows need a multiple of {block} elements, got {in_features}")
    return in_features // block * size


def dequantize(qweight: Tensor, qtype: int, in_features: int) -> Tensor:
    """Block rows [M, bytes] (uint8) -> float32 [M, in_features]: by the C++ kernels on the CPU where they are built,
    else by torch operators on the blocks' device (kernels/dequant.py; the same values, bit for bit)."""
    ext = extension() if qweight.device.type == "cpu" else None
    if ext is not None:
        return ext.dequantize(qweight.contiguous(), qtype, in_features)
    from sputnik.kernels.dequant import dequantize_blocks

    name, block, size = TYPES[qtype]
    row_bytes(qtype, in_features)  # a clear error for a width the type cannot hold
    return dequantize_blocks(qweight, name, block, size, in_features)


def qmatmul(x: Tensor, qweight: Tensor, qtype: int, path: str | None = None) -> Tensor:
    """x [N, K] float32 @ block weights [M, bytes]^T -> [N, M] float32 (path: a name of PATHS; None: the best)."""
    return extension().qmatmul(x, qweight, qtype, -1 if path is None else PATHS[path])


# The same two products as torch operators, so that a compiled decode step (Engine(compile=True)) keeps them inside
# its one graph instead of breaking it at every layer. Eager calls go to the extension directly: the dispatcher's
# few microseconds per call are what an eager step at batch 1 pays most of.
@torch.library.custom_op("sputnik::qmatmul", mutates_args=())
def qmatmul_op(x: Tensor, qweight: Tensor, qtype: int) -> Tensor:
    return extension().qmatmul(x, qweight, qtype, -1)


@qmatmul_op.register_fake
def _(x: Tensor, qweight: Tensor, qtype: int) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("sputnik::qmatmul_cat", mutates_args=())
def qmatmul_cat_op(x: Tensor, qweights: list[Tensor], qtypes: list[int]) -> Tensor:
    return extension().qmatmul_cat(x, qweights, qtypes, -1)


@qmatmul_cat_op.register_fake
def _(x: Tensor, qweights: list[Tensor], qtypes: list[int]) -> Tensor:
    return x.new_empty((x.shape[0], sum(w.shape[0] for w in qweights)), dtype=torch.float32)


@torch.library.custom_op("sputnik::dequantize", mutates_args=())
def dequantize_op(qweight: Tensor, qtype: int, in_features: int) -> Tensor:
    return extension().dequantize(qweight.contiguous(), qtype, in_features)


@dequantize_op.register_fake
def _(qweight: Tensor, qtype: int, in_features: int) -> Tensor:
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


@dataclass
class QTensor:
    """A weight in a GGUF block format: rows [out_features, row bytes] of raw blocks (uint8), each row holding
    in_features values of type qtype (a ggml type id)."""

    data: Tensor
    qtype: int
    shape: tuple[int, int]

    @property
    def type_name(self) -> str:
        return TYPES[self.qtype][0]

    def dequantize(self) -> Tensor:
        return dequantize(self.data, self.qtype, self.shape[1])


class QuantLinear(nn.Module):
    """A linear layer over block-format weights (no autograd: an inference layer)."""

    def __init__(self, weight: QTensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        if weight.data.shape != (self.out_features, row_bytes(self.qtype, self.in_features)):
            raise ValueError(f"{weight.type_name} weight of {tuple(weight.data.shape)} bytes for shape {weight.shape}")
        self.register_buffer("qweight", weight.data.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dense: Tensor | None = None  # the fallback's dequantized weight

    def forward(self, x: Tensor) -> Tensor:
        if self.qweight.device.type == "cpu" and available():
            flat = x.reshape(-1, self.in_features).float()
            if torch.compiler.is_compiling():
                y = qmatmul_op(flat, self.qweight, self.qtype)
            else:
                y = extension().qmatmul(flat, self.qweight, self.qtype, -1)
            if self.bias is not None:
                y += self.bias.float()
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self.qweight.device.type != "cpu":  # a GPU: the blocks stay in its memory, decoded for each product
            return F.linear(x, dequantize(self.qweight, self.qtype, self.in_features).to(x.dtype), self.bias)
        if self._dense is None or self._dense.dtype != x.dtype:  # a CPU without the kernels: decoded once
            self._dense = dequantize(self.qweight, self.qtype, self.in_features).to(x.dtype)
        return F.linear(x, self._dense, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {TYPES[self.qtype][0]}, bias={self.bias is not None}"


class QuantLinears:
    """Several QuantLinears that read the same input (q/k/v, gate/up) as one product, their outputs side by side:
    the input is quantized once and the threads split all their rows in one call. Holds the layers, not copies."""

    def __init__(self, layers: list[QuantLinear]):
        self.layers = layers
        self.qtypes = [m.qtype for m in layers]
        self.in_features = layers[0].in_features
        self.out_features = sum(m.out_features for m in layers)

    def __call__(self, x: Tensor) -> Tensor:
        weights = [m.qweight for m in self.layers]  # read each call: the model may have been moved
        if weights[0].device.type != "cpu" or not available():
            return torch.cat([m(x) for m in self.layers], -1)
        flat = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():
            y = qmatmul_cat_op(flat, weights, self.qtypes)
        else:
            y = extension().qmatmul_cat(flat, weights, self.qtypes, -1)
        if self.layers[0].bias is not None:
            y += torch.cat([m.bias for m in self.layers]).float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @staticmethod
    def of(layers) -> QuantLinears | None:
        """The group, or None where the layers cannot share a call (not all QuantLinears, inputs or biases differ)."""
        if not all(type(m) is QuantLinear for m in layers) or len({m.in_features for m in layers}) > 1:
            return None
        if len({m.bias is None for m in layers}) > 1:
            return None
        return QuantLinears(list(layers))


class QuantEmbedding(nn.Module):
    """An embedding table in a block format: the looked-up rows are dequantized, the table never is."""

    def __init__(self, weight: QTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.qtype = weight.qtype
        self.register_buffer("qweight", weight.data.contiguous())
        self.out_dtype = dtype

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.qweight.index_select(0, tokens.reshape(-1))
        if torch.compiler.is_compiling() and rows.device.type == "cpu" and available():
            out = dequantize_op(rows, self.qtype, self.embedding_dim).to(self.out_dtype)
        else:
            out = dequantize(rows, self.qtype, self.embedding_dim).to(tokens.device, self.out_dtype)
        return out.view(*tokens.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # follow the model's dtype casts (model.to(torch.bfloat16)) although the table itself stays in its blocks
        probe = fn(torch.empty(0))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {TYPES[self.qtype][0]}"
