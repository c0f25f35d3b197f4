"""The block-format kernels against a dequantize-then-matmul reference (gguf's own decoder), every type, every path
this CPU runs, odd shapes."""

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import sputnik.kernels as K
from sputnik.kernels import QTensor, QuantEmbedding, QuantLinear

pytestmark = pytest.mark.skipif(not K.available(), reason="no C++ compiler for the kernels")

INTEGER = ["Q8_0", "Q4_0", "Q4_1"]  # quantized by gguf from floats; integer dot products on AVX2
DECODED = ["Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]
SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each block's fp16 scales


def blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Rows of `name` blocks [rows, bytes] holding plausible weights."""
    rng = np.random.default_rng(seed)
    t = GGMLQuantizationType[name]
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    if name in INTEGER or name == "BF16":
        return gguf_quantize(w, t)
    if name in ("F16", "F32"):
        return w.astype(np.float16 if name == "F16" else np.float32).view(np.uint8)
    _, block, size = K.TYPES[K.TYPE_IDS[name]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)  # any bytes are a valid K-quant block
    for off in SCALES[name]:
        scale = rng.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16)
        raw[..., off : off + 2] = scale[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def reference(name: str, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[name]).astype(np.float32))


@pytest.mark.parametrize("name", INTEGER + DECODED)
def test_dequantize_equals_gguf(name):
    cols = 512 if name.endswith("_K") else 96
    raw = blocks(name, 5, cols)
    ours = K.dequantize(torch.from_numpy(raw), K.TYPE_IDS[name], cols)
    assert torch.equal(ours, reference(name, raw))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", INTEGER + DECODED)
def test_torch_decoders_equal_gguf(name, device):
    # the GPU path (and the CPU's without a compiler) decodes blocks with torch operators: the same values
    from sputnik.kernels.dequant import dequantize_blocks

    cols = 768 if name.endswith("_K") else 96
    raw = blocks(name, 7, cols, seed=3)
    _, block, size = K.TYPES[K.TYPE_IDS[name]]
    ours = dequantize_blocks(torch.from_numpy(raw).to(device), name, block, size, cols)
    assert ours.device.type == device and torch.equal(ours.cpu(), reference(name, raw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_block_layers_on_a_gpu_keep_their_blocks():
    raw = torch.from_numpy(blocks("Q4_K", 24, 256))
    w = QTensor(raw, K.TYPE_IDS["Q4_K"], (24, 256))
    layer, emb = QuantLinear(w).cuda(), QuantEmbedding(w).cuda()
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x.cuda()).cpu(), x @ w.dequantize().T, atol=1e-4)
    assert layer._dense is None and layer.qweight.is_cuda  # nothing dense kept beside the blocks
    assert torch.equal(emb(torch.tensor([5, 0]).cuda()).cpu(), w.dequantize()[[5, 0]])


def q8_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most that rounding activations to 8 bits per block of 32 (scale amax/127) can move x @ w.T: half a step
    per element, times |w|."""
    step = x.abs().view(x.shape[0], -1, 32).amax(-1) / 127
    half = (step / 2).repeat_interleave(32, 1)
    return half.double() @ w.abs().double().T


@pytest.mark.parametrize("path", list(K.PATHS))
@pytest.mark.parametrize("name", INTEGER + DECODED)
@pytest.mark.parametrize("n,m,blocks_per_row", [(1, 1, 1), (3, 7, 3), (5, 37, 2), (9, 130, 4)])
def test_qmatmul_matches_dequantized_matmul(name, path, n, m, blocks_per_row):
    if path not in K.cpu_paths():
        pytest.skip(f"this CPU has no {path} path")
    cols = blocks_per_row * (256 if name.endswith("_K") else 32)
    raw = blocks(name, m, cols, seed=n + m)
    w = reference(name, raw)
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(m))
    x[0, :5] *= 30  # an outlier, as real activations have
    got = K.qmatmul(x, torch.from_numpy(raw), K.TYPE_IDS[name], path)
    want = x.double() @ w.double().T
    assert got.shape == (n, m) and got.dtype == torch.float32
    float_slack = 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6
    integer = path != "portable" and name in INTEGER
    bound = q8_error_bound(x, w) + float_slack if integer else float_slack
    assert ((got.double() - want).abs() <= bound).all()
    if integer:  # the activations really are rounded: a path that skipped it would sit far inside the bound
        assert (got.double() - want).abs().max() > 0


@pytest.mark.parametrize("path", list(K.PATHS))
@pytest.mark.parametrize("name", INTEGER + DECODED)
def test_a_row_does_not_depend_on_its_batch(name, path):
    """A token's output is the same, bit for bit, alone or among 32 (however the rows and tokens are tiled): a seeded
    request samples the same in a crowd as alone."""
    if path not in K.cpu_paths():
        pytest.skip(f"this CPU has no {path} path")
    cols = 2 * (256 if name.endswith("_K") else 32)
    raw = torch.from_numpy(blocks(name, 37, cols, seed=1))
    x = torch.randn(32, cols, generator=torch.Generator().manual_seed(2))
    crowd = K.qmatmul(x, raw, K.TYPE_IDS[name], path)
    for i in (0, 5, 31):
        assert torch.equal(K.qmatmul(x[i : i + 1], raw, K.TYPE_IDS[name], path)[0], crowd[i])
        assert torch.equal(K.qmatmul(x[i : i + 3], raw, K.TYPE_IDS[name], path)[0], crowd[i])


@pytest.mark.parametrize("path", list(K.PATHS))
@pytest.mark.parametrize("n", [1, 6])
def test_several_weights_in_one_call_equal_each_alone(path, n):
    """q/k/v (or gate/up) in one call, types mixed as a K-quant file mixes them: each weight's columns are bit for
    bit what it gives alone, whoever shares the call and however the threads split the rows."""
    if path not in K.cpu_paths():
        pytest.skip(f"this CPU has no {path} path")
    cols = 256
    names, rows = ["Q4_1", "Q6_K", "Q8_0", "Q4_1"], [37, 16, 5, 64]
    raws = [torch.from_numpy(blocks(t, r, cols, seed=i)) for i, (t, r) in enumerate(zip(names, rows))]
    types = [K.TYPE_IDS[t] for t in names]
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([K.qmatmul(x, w, t, path) for w, t in zip(raws, types)], 1)
    together = K.extension().qmatmul_cat(x, raws, types, K.PATHS[path])
    assert together.shape == (n, sum(rows)) and torch.equal(together, alone)


@pytest.mark.parametrize("name", INTEGER)
def test_every_integer_path_gives_avx2s_results_bit_for_bit(name):
    """VNNI's vpdpbusd adds the same products as AVX2's vpmaddubsw + vpmaddwd (no int16 saturation at these ranges),
    and 16 rows to a zmm scale each block's exact integer sum as 8 rows to a ymm do, so a CPU with VNNI or AVX-512
    computes exactly what one without them does. 37 rows: a panel's rows past the end are not written."""
    faster = [p for p in ("vnni", "avx512") if p in K.cpu_paths()]
    if not faster:
        pytest.skip("this CPU has no VNNI")
    raw = torch.from_numpy(blocks(name, 37, 128, seed=4))
    x = torch.randn(13, 128, generator=torch.Generator().manual_seed(5))
    x[0, :5] *= 30
    for n in (1, 5, 13):
        avx2 = K.qmatmul(x[:n], raw, K.TYPE_IDS[name], "avx2")
        for path in faster:
            assert torch.equal(K.qmatmul(x[:n], raw, K.TYPE_IDS[name], path), avx2), (path, n)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64", reason="x86 Linux flags")
def test_the_paths_follow_the_cpu_flags():
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":")[1].split())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    vnni = avx2 and ({"avx512_vnni", "avx512vl"} <= flags or "avx_vnni" in flags)
    avx512 = avx2 and {"avx512_vnni", "avx512vl", "avx512f", "avx512bw"} <= flags
    assert K.cpu_paths() == ["portable"] + ["avx2"] * avx2 + ["vnni"] * vnni + ["avx512"] * avx512
    with pytest.raises(RuntimeError, match="not available"):
        beyond = len(K.cpu_paths())  # the first path past this CPU's best
        K.extension().qmatmul(torch.randn(1, 32), torch.from_numpy(blocks("Q8_0", 1, 32, seed=0)), 8, beyond)


def test_quant_linears_group_equals_its_layers():
    layers = [QuantLinear(QTensor(torch.from_numpy(blocks("Q4_1", r, 64, seed=r)), K.TYPE_IDS["Q4_1"], (r, 64)),
                          torch.randn(r)) for r in (24, 8, 8)]
    group = K.QuantLinears.of(layers)
    x = torch.randn(2, 3, 64)
    assert torch.equal(group(x), torch.cat([m(x) for m in layers], -1))
    assert group(x.bfloat16()).dtype == torch.bfloat16
    assert K.QuantLinears.of([layers[0], torch.nn.Linear(64, 8)]) is None  # a dense layer cannot share the call
    unbiased = QuantLinear(QTensor(layers[1].qweight, K.TYPE_IDS["Q4_1"], (8, 64)))
    assert K.QuantLinears.of([layers[0], unbiased]) is None


def test_qmatmul_rejects_bad_shapes():
    raw = torch.from_numpy(blocks("Q4_1", 4, 64))
    with pytest.raises(RuntimeError, match="bytes"):
        K.qmatmul(torch.randn(2, 96), raw, K.TYPE_IDS["Q4_1"])
    with pytest.raises(RuntimeError, match="multiple of the block size"):
        K.qmatmul(torch.randn(2, 50), raw, K.TYPE_IDS["Q4_1"])


def test_quant_linear_and_embedding():
    raw = torch.from_numpy(blocks("Q8_0", 40, 64))
    w = QTensor(raw, K.TYPE_IDS["Q8_0"], (40, 64))
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(40, generator=g)
    layer = QuantLinear(w, bias)
    x = torch.randn(2, 3, 64, generator=g)
    want = x @ w.dequantize().T + bias
    # within the 8-bit activations' rounding (a fixed atol of 2e-2 failed on ~1% of random draws: 0.0214 at worst)
    bound = q8_error_bound(x.view(-1, 64), w.dequantize()).view(2, 3, 40) + 1e-5
    assert ((layer(x).double() - want.double()).abs() <= bound).all()
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    emb = QuantEmbedding(w)
    tokens = torch.tensor([[3, 0, 39]])
    assert torch.equal(emb(tokens), w.dequantize()[tokens])
    assert emb.to(torch.bfloat16)(tokens).dtype == torch.bfloat16 and emb.qweight.dtype == torch.uint8


def test_fallback_without_kernels_decodes_with_torch(monkeypatch):
    raw = torch.from_numpy(blocks("Q4_1", 8, 64))
    w = QTensor(raw, K.TYPE_IDS["Q4_1"], (8, 64))
    x = torch.randn(3, 64)
    fast = QuantLinear(w)(x)
    monkeypatch.setattr(K, "_ext", None)
    monkeypatch.setattr(K, "_ext_error", "disabled for the test")
    assert not K.available()
    dense = w.dequantize()
    assert torch.equal(dense, reference("Q4_1", raw.numpy()))
    slow = QuantLinear(w)(x)
    assert torch.allclose(slow, x @ dense.T, atol=1e-5)
    assert torch.allclose(fast, slow, atol=5e-2)


def test_kernels_of_other_sources_build_in_another_folder(tmp_path):
    # Two checkouts with different kernels (a worktree, an upgrade) must not rebuild one library over the other,
    # which a running process may have loaded.
    import shutil

    here = Path(K.__file__).parent
    for name in K.SOURCES:
        shutil.copy(here / name, tmp_path / name)
    assert K.build_dir(tmp_path) == K.build_dir()
    (tmp_path / "decode.cpp").write_text((here / "decode.cpp").read_text() + "\n// changed\n")
    assert K.build_dir(tmp_path) != K.build_dir() and K.build_dir(tmp_path).parent == K.build_dir().parent
    from torch.utils.cpp_extension import get_default_build_root

    assert K.build_dir().parent.parent == Path(get_default_build_root())  # torch's root, named without importing it


def test_a_finished_build_is_imported_without_setuptools():
    # Loading the model used to import torch.utils.cpp_extension (and setuptools with it, ~4 MB resident) only to
    # find the library up to date; a finished build is now imported directly.
    code = ("import sys, sputnik.kernels as K; assert K.available(); "
            "assert 'setuptools' not in sys.modules and 'torch.utils.cpp_extension' not in sys.modules, 'imported'")
    done = subprocess.run([sys.executable, "-c", code], timeout=600, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (K.build_dir() / K.BUILT).exists()


def test_a_killed_build_does_not_block_the_next():
    # A build killed midway (Ctrl-C, a CI timeout) leaves torch's `lock` file behind; the next process used to wait
    # on it forever, at import time of any test module that asks whether the kernels are available.
    lock = K.build_dir() / "lock"
    lock.touch()
    (K.build_dir() / K.BUILT).unlink(missing_ok=True)  # as if the build had not finished: the compile path runs
    code = "import sputnik.kernels as K; assert K.available()"
    done = subprocess.run([sys.executable, "-c", code], timeout=600, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not lock.exists() and (K.build_dir() / K.BUILT).exists()
