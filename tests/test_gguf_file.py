"""sputnik's GGUF header reader against the `gguf` package's writer and reader: every metadata type, tensor bytes as
views of the file, and clear errors on files that are not GGUF or are cut short."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from sputnik.tokenizer.gguf_file import GGML_SIZES, StringArray, read_gguf


VOCAB = [f"tok{i}" for i in range(3000)] + ["", "Ġ한국어", "a b", "\\\"", "🚀"]


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_int32("t.int32", -7)
    w.add_uint8("t.u8", 200)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "한국어 text")
    w.add_array("t.strings", ["a", "", "토큰", "<|im_end|>"])
    w.add_array("t.vocab", VOCAB)  # long enough to be kept as bytes (StringArray)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((3, 64)).astype(np.float32)
    q8 = quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("dense.weight", dense)
    w.add_tensor("q8.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, dense, q8


def test_metadata_matches_the_gguf_package(written):
    path, _, _ = written
    ours, theirs = read_gguf(path), GGUFReader(path)
    assert ours.version == 3
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in ours.fields
        want = field.contents()
        got = ours.fields[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6)
        elif isinstance(want, list) and want and isinstance(want[0], float):
            assert got == pytest.approx(want)
        else:
            assert got == want, key
    assert ours.get("llama.attention.layer_norm_rms_epsilon") == 1e-05  # float32 in its short decimal form
    assert ours.get("t.strings") == ["a", "", "토큰", "<|im_end|>"]
    assert ours.get("missing", 4) == 4
    vocab = ours.get("t.vocab")
    assert isinstance(vocab, StringArray) and len(vocab) == len(VOCAB) and vocab == VOCAB and list(vocab) == VOCAB
    assert vocab[0] == "tok0" and vocab[-1] == "🚀" and vocab[-5] == "" and vocab[2998:3001] == VOCAB[2998:3001]
    with pytest.raises(IndexError):
        vocab[len(VOCAB)]


def test_tensors_are_the_written_bytes(written):
    path, dense, q8 = written
    tensors = {t.name: t for t in read_gguf(path).tensors}
    assert tensors["dense.weight"].shape == (64, 3)  # fastest-first, as GGUF lists dims
    assert tensors["dense.weight"].n_elements == 3 * 64
    assert np.array_equal(tensors["dense.weight"].data.view(np.float32).reshape(3, 64), dense)
    q = tensors["q8.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q8_0 and q.shape == (64, 4)
    assert np.array_equal(q.data.reshape(q8.shape), q8)
    assert not q.data.flags.writeable  # a view of the read-only map, never a copy to write


def test_not_gguf_and_truncated_files_raise(tmp_path, written):
    path, _, _ = written
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, just some text")
    with pytest.raises(ValueError, match="no GGUF magic"):
        read_gguf(junk)
    raw = path.read_bytes()
    for cut in (30, len(raw) // 2, len(raw) - 100):  # the header, the first tensor, the last one
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_gguf(short)


def test_the_type_sizes_are_ggmls():
    """The reader's own table of block sizes (it does not import the gguf package) agrees with the gguf package's
    for every type either knows."""
    theirs = {int(t): size for t, size in GGML_QUANT_SIZES.items()}
    assert {t: GGML_SIZES[t] for t in theirs if t in GGML_SIZES} == {t: theirs[t] for t in GGML_SIZES if t in theirs}
    assert set(theirs) <= set(GGML_SIZES), set(theirs) - set(GGML_SIZES)
