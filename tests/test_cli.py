"""The `sputnik` command: generate --json, chat without a TTY, convert, and clear errors naming the file."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from sputnik.checkpoint import CheckpointError, load_model
from sputnik.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_one_object_per_completion(capsys, default_gguf, default_tokenizer):
    code, out, _ = run(capsys, "generate", "--model", str(default_gguf), "--prompt", "Name a color.", "--chat",
                       "--system", "Answer in one word.", "--max-tokens", "12", "--temperature", "0.8", "--top-p",
                       "0.9", "--top-k", "40", "--seed", "3", "--n", "3", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and 1 <= len(r["token_ids"]) <= 12
        body = [t for t in r["token_ids"] if t not in default_tokenizer.stop_ids]
        assert r["text"] == default_tokenizer.decode(body)
    # Same seed, same samples.
    _, again, _ = run(capsys, "generate", "--model", str(default_gguf), "--prompt", "Name a color.", "--chat",
                      "--system", "Answer in one word.", "--max-tokens", "12", "--temperature", "0.8", "--top-p",
                      "0.9", "--top-k", "40", "--seed", "3", "--n", "3", "--json")
    assert again == out


def test_generate_raw_prompt_streams_text(capsys, default_gguf):
    code, out, _ = run(capsys, "generate", "--model", str(default_gguf), "--prompt", "The capital of France is",
                       "--max-tokens", "6")
    assert code == 0 and "Paris" in out
    code, full, _ = run(capsys, "generate", "--model", str(default_gguf), "--prompt", "The capital of France is",
                        "--max-tokens", "6", "--kv-dtype", "float32")  # auto keeps bfloat16 under these blocks
    assert code == 0 and "Paris" in full


def test_chat_without_tty_answers_the_piped_prompt(default_gguf):
    proc = subprocess.run([sys.executable, "-m", "sputnik.cli", "chat", "--model", str(default_gguf), "--max-tokens",
                           "16", "--seed", "0"], input="What is 2 + 2?\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "What is 2 + 2?" in proc.stdout and len(proc.stdout.strip().splitlines()) >= 2


def test_chat_prefills_only_what_each_turn_adds(capsys, monkeypatch, default_gguf):
    """The conversation's KV stays in the engine's prefix cache: the second turn's prompt (the first exchange, then
    the new message) prefills only its tail, in whole blocks."""
    import io

    import sputnik.engine.generate

    engines = []

    class Recorded(sputnik.engine.generate.Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            engines.append(self)

    monkeypatch.setattr(sputnik.engine.generate, "Engine", Recorded)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story about a cat and a dog who live by the sea, "
                                                  "in five sentences, please.\nAnd now one about a bird.\n"))
    code, out, _ = run(capsys, "chat", "--model", str(default_gguf), "--max-tokens", "64", "--temperature", "0")
    assert code == 0 and "And now one about a bird." in out
    stats = engines[0].stats
    assert stats["prefix_hit_tokens"] >= 64 and stats["prompt_tokens"] - stats["prefix_hit_tokens"] < 150


def test_convert_gguf_to_hf_folder_loads_in_transformers(capsys, tmp_path, default_gguf):
    code, out, _ = run(capsys, "convert", str(default_gguf), str(tmp_path / "hf"))
    assert code == 0 and str(tmp_path / "hf") in out
    ours = load_model(default_gguf)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ref_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([ref_tok("Hello, 세계! 12 + 30 =").input_ids])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids))


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert code == 2 and "nowhere" in err


def test_unknown_name_lists_known_models(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "hi")
    assert code == 2 and "no-such-model" in err and "smollm2-135m-instruct" in err


def test_shape_mismatch_names_file_tensor_and_both_shapes(tmp_path):
    cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "shape mismatch for model.layers.0.mlp." in msg
    assert ("has (32, 37)" in msg and "expects (32, 40)" in msg) or ("has (37, 32)" in msg and "expects (40, 32)" in msg)


@pytest.mark.parametrize("flags,bf16", [
    ({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}, True),  # Zen 4 / Cooper Lake: AVX512-BF16 dot products
    ({"avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"}, True),  # Sapphire Rapids: AMX tiles
    ({"avx2", "fma", "avx512f", "avx512_vnni"}, False),  # AVX-512 without bf16 (Ice Lake): fp32 is faster
    ({"avx2", "fma", "f16c"}, False),  # Zen 2/3, most laptops
    (set(), False),
])
def test_dtype_auto_per_cpu_flag(flags, bf16):
    import torch

    from sputnik.device import fast_bf16, pick_dtype

    assert fast_bf16("cpu", flags) is bf16
    assert pick_dtype("auto", "cpu", flags) == (torch.bfloat16 if bf16 else torch.float32)
    assert pick_dtype("float32", "cpu", flags) == torch.float32  # an explicit dtype is never overridden


def test_dtype_auto_is_bf16_only_where_the_device_multiplies_it_natively():
    import torch

    from sputnik.cli import ChatArgs, ModelArgs, parse
    from sputnik.device import pick_dtype
    from sputnik.serve.config import ServeConfig

    from sputnik.device import BF16_CPU_FLAGS, cpu_flags

    native = any(f in cpu_flags() for f in BF16_CPU_FLAGS)
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("bf16", "cpu") == torch.bfloat16 and pick_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        pick_dtype("int4", "cpu")
    # The server defaults to auto (throughput); the other commands to float32 (parity, reproducibility).
    assert parse(["serve"]).config(ServeConfig).dtype == "auto"
    assert parse(["generate", "--prompt", "x"]).config(ModelArgs).dtype == "float32"
    # The KV cache's dtype, in every command (auto: tests/test_native_decode.py).
    assert parse(["serve"]).config(ServeConfig).kv_dtype == "auto"
    assert parse(["serve", "--kv-dtype", "bfloat16"]).config(ServeConfig).kv_dtype == "bfloat16"
    assert parse(["eval", "--kv-dtype", "float32"]).config(ModelArgs).kv_dtype == "float32"
    with pytest.raises(SystemExit):
        parse(["chat", "--kv-dtype", "int8"])
    # The compiled decode step is opt-in (it costs minutes of compiling the first time).
    assert not parse(["serve"]).config(ServeConfig).compile and parse(["serve", "--compile"]).config(ServeConfig).compile
    assert parse(["chat", "--compile"]).config(ChatArgs).compile and not parse(["generate", "-p", "x"]).config(
        ChatArgs).compile
