"""Load llama.cpp GGUF files as a Hugging Face config dict and state dict.

Every tensor is dequantised with the ``gguf`` package (F32, F16, BF16, Q4_0,
Q4_1, Q8_0, the K-quants, ...), renamed to the HF name and, for the ``llama``
architecture, has llama.cpp's rotary row permutation of ``attn_q``/``attn_k``
undone. Qwen2/Qwen3 files are written without that permutation (their HF rope
already rotates halves, as llama.cpp's NEOX mode does), so they are left alone.
``deepseek2`` files (DeepSeek-V3: MLA and MoE) rotate adjacent pairs, as HF's
``rope_interleave`` does; their stacked experts are split per expert, and MLA's
``attn_k_b``/``attn_v_b`` (or the legacy ``attn_kv_b``) become ``kv_b_proj``.

With ``keep_blocks`` the matrices stored in a type the kernels multiply
(sputnik.kernels.TYPES) stay in their blocks, as QTensors, and are never
dequantized; the rope permutation then moves whole rows of blocks.
"""

from __future__ import annotations


import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from sputnik.checkpoint.hf import CheckpointError
from sputnik.kernels import TYPES, QTensor, row_bytes
from sputnik.tokenizer.gguf import open_gguf
from sputnik.tokenizer.gguf_file import GGUFFile

# GGUF architecture -> (HF model_type, HF architecture class).
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "deepseek2": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # deepseek2: multi-head latent attention, the router and the shared experts
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}

# deepseek2's routed experts, stacked [n_expert, out, in] in one tensor per projection.
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# The router's correction bias (llama.cpp's exp_probs_b) and MLA's split kv_b_proj halves.
EXPERT_BIAS, K_B, V_B = "exp_probs_b", "attn_k_b", "attn_v_b"
# Read as matrices by the model (the router's F.linear on its weight, MLA's folded kv_b_proj): always dense.
_DENSE_PARTS = {"ffn_gate_inp", "attn_kv_b", K_B, V_B}

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Raw bytes dequantised per call; big enough to amortise numpy overhead, small enough for memory.
_CHUNK_BYTES = 1 << 22

# llama.cpp stores Llama-3 rope scaling only as this tensor of per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              keep_blocks: bool = False) -> tuple[dict, dict[str, torch.Tensor | QTensor]]:
    """Read a GGUF file into ``(hf_config, state_dict)`` with HF tensor names (QTensors where blocks are kept).

    The state dict has no ``lm_head.weight`` when the file has no ``output.weight``
    (the config then says ``tie_word_embeddings: true``).
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise CheckpointError(f"no such file or folder: {file}")
    try:
        reader = open_gguf(file)
    except Exception as err:
        raise CheckpointError(f"GGUF file {file} is truncated or corrupt ({type(err).__name__}: {err})") from None

    arch = reader.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF file {file} has unsupported architecture {arch!r};"
            f" supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(reader, arch, tensors, file)

    state_dict: dict[str, torch.Tensor | QTensor] = {}
    mla_halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"] by _hf_config
        match = _BLOCK_TENSOR.match(name)
        part = match.group(2) if match else None
        block = re.match(r"blk\.(\d+)\.", name)
        if block and int(block.group(1)) >= config["num_hidden_layers"]:
            continue  # deepseek2's multi-token-prediction blocks come after the model's: inference skips them
        blocks = keep_blocks and _keeps_blocks(tensor) and part not in _DENSE_PARTS
        if part in EXPERT_NAMES:
            for j, weight in enumerate(_experts(tensor, file, blocks)):
                state_dict[f"model.layers.{match.group(1)}.mlp.experts.{j}.{EXPERT_NAMES[part]}.weight"] = (
                    weight if blocks else weight.to(dtype))
            continue
        if part in (K_B, V_B):
            mla_halves.setdefault(match.group(1), {})[part] = _dequantize(tensor, file)
            continue
        if part == EXPERT_BIAS:
            state_dict[f"model.layers.{match.group(1)}.mlp.gate.e_score_correction_bias"] = _dequantize(tensor, file)
            continue
        hf_name = _hf_name(name)
        if hf_name is None:
            raise CheckpointError(f"GGUF file {file}: tensor {name!r} has no Hugging Face name for {arch}")
        weight = _blocks(tensor) if blocks else _dequantize(tensor, file)
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias")):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif arch == "llama" and name.endswith((".attn_k.weight", ".attn_k.bias")):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        state_dict[hf_name] = weight if blocks else weight.to(dtype)
    for layer, halves in mla_halves.items():
        if set(halves) != {K_B, V_B}:
            raise CheckpointError(f"GGUF file {file}: layer {layer} has only one of {K_B} and {V_B}")
        state_dict[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = join_kv_b(halves[K_B], halves[V_B]).to(dtype)
    # What was copied (llama's q/k rows, dequantized tensors) was read once through the map: its pages leave the RSS.
    reader.keep_resident(t.data if isinstance(t, QTensor) else t for t in state_dict.values())
    return config, state_dict


def _keeps_blocks(tensor) -> bool:
    """A matrix (or a stack of expert matrices) in a block type the kernels multiply (F32 ones are as fast dense)."""
    return tensor.tensor_type in TYPES and tensor.tensor_type != 0 and len(tensor.shape) in (2, 3)  # 3: experts


def _blocks(tensor) -> QTensor:
    """A GGUF matrix as rows of its raw blocks: a view of the file's read-only mmap, as llama.cpp reads it, so the
    weights take memory once (the page cache's) and load without a copy. Nothing writes to a QTensor."""
    cols, rows = (int(d) for d in tensor.shape)  # GGUF lists dims fastest-first
    data = tensor.data.reshape(rows, row_bytes(tensor.tensor_type, cols))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return QTensor(torch.from_numpy(data), int(tensor.tensor_type), (rows, cols))


def _experts(tensor, file: Path, blocks: bool) -> list[torch.Tensor | QTensor]:
    """A stacked expert tensor (GGUF dims {in, out, n_expert}) as one [out, in] weight per expert."""
    cols, rows, n = (int(d) for d in tensor.shape)
    if blocks:
        data = tensor.data.reshape(n, rows, row_bytes(tensor.tensor_type, cols))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mmap, as in _blocks
            return [QTensor(torch.from_numpy(data[j]), int(tensor.tensor_type), (rows, cols)) for j in range(n)]
    return list(_dequantize(tensor, file).unbind(0))


def split_kv_b(kv_b: torch.Tensor, n_head: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's kv_b_proj [H*(nope+v), R] as llama.cpp stores it: k_b [H, R, nope] (transposed, for absorbing into the
    query) and v_b [H, v, R]."""
    per_head = kv_b.reshape(n_head, -1, kv_b.shape[-1])
    return per_head[:, :nope].transpose(1, 2).contiguous(), per_head[:, nope:].contiguous()


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`split_kv_b`."""
    return torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, k_b.shape[1])


def permute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's conversion of HF q/k rows: per head, halves [a0..a(d/2), b0..] -> pairs (a0, b0, a1, b1, ...).

    HF rotates the first half of each head against the second; llama.cpp's
    llama rope rotates adjacent pairs, so its converter interleaves the rows.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight: torch.Tensor | QTensor, n_head: int) -> torch.Tensor | QTensor:
    """Exact inverse of :func:`permute_rope_rows`: pairs back to halves (a QTensor's rows of blocks too).

    The forward map views rows as (head, half, i) and swaps to (head, i, half);
    reading the rows as (head, i, half) and swapping back restores (head, half, i).
    """
    if isinstance(weight, QTensor):
        return QTensor(unpermute_rope_rows(weight.data, n_head).contiguous(), weight.qtype, weight.shape)
    rows = weight.shape[0]
    head_dim = rows // n_head
    return weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str | None:
    """HF state-dict name of a GGUF tensor name, or None when there is none."""
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    match = _BLOCK_TENSOR.match(name)
    if match and match.group(2) in BLOCK_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{suffix}"
    return None


def _dequantize(tensor, file: Path) -> torch.Tensor:
    """One GGUF tensor as float32 in HF shape order (GGUF lists dims fastest-first).

    Quant blocks never straddle rows, so the raw bytes can be cut into large
    block-aligned pieces; that is ~4x faster than gguf's 16-rows-at-a-time loop
    and keeps the temporary arrays small for big tensors.
    """
    shape = tuple(int(d) for d in reversed(tensor.shape))
    raw = tensor.data  # uint8 bytes, a view of the file's map
    if tensor.tensor_type in _PLAIN:  # norms and biases: no need for the gguf package (or its memory)
        return torch.from_numpy(raw.view(_PLAIN[tensor.tensor_type]).astype(np.float32)).reshape(shape)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in GGML_QUANT_SIZES:
        raise CheckpointError(f"GGUF file {file}: tensor {tensor.name!r} has unknown type {qtype!r}")
    _, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty(int(tensor.n_elements), dtype=np.float32)
    step = max(1, _CHUNK_BYTES // type_size) * type_size
    filled = 0
    for start in range(0, raw.size, step):
        try:
            piece = dequantize(raw[start : start + step].reshape(1, -1), qtype).reshape(-1)
        except NotImplementedError as err:
            raise CheckpointError(f"GGUF file {file}: tensor {tensor.name!r}: {err}") from None
        out[filled : filled + piece.size] = piece  # a copy, so nothing keeps the read-only mmap alive
        filled += piece.size
    if filled != out.size:
        raise CheckpointError(f"GGUF file {file}: tensor {tensor.name!r} is truncated")
    return torch.from_numpy(out).reshape(shape)


_PLAIN = {0: np.float32, 1: np.float16}  # ggml F32, F16: read as they are (astype copies off the read-only map)


def _hf_config(reader: GGUFFile, arch: str, tensors: dict, file: Path) -> dict:
    """The HF config.json dict described by the GGUF metadata and tensor shapes."""
    model_type, architecture = SUPPORTED_ARCHITECTURES[arch]

    def need(key: str):
        value = reader.get(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"GGUF file {file} lacks metadata {arch}.{key}")
        return value

    hidden = need("embedding_length")
    n_head = need("attention.head_count")
    n_kv_head = reader.get(f"{arch}.attention.head_count_kv", n_head)
    head_dim = reader.get(f"{arch}.attention.key_length")
    if head_dim is None and "blk.0.attn_q.weight" in tensors:
        head_dim = int(tensors["blk.0.attn_q.weight"].shape[1]) // n_head  # shape is (in, out)
    head_dim = head_dim or hidden // n_head

    vocab = reader.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[1])

    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": reader.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": reader.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": reader.get(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": reader.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": reader.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "deepseek2":
        config.update(_deepseek2_config(reader, tensors, file))
    elif model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    elif model_type == "qwen3":
        config["attention_bias"] = False

    rope_scaling = _rope_scaling(reader, arch)
    mscale = config.pop("_yarn_mscale_all_dim", None)
    if rope_scaling is not None and mscale is not None:
        rope_scaling.update(mscale=mscale, mscale_all_dim=mscale)
    if rope_scaling is None and _ROPE_FREQS in tensors:
        freqs = _dequantize(tensors[_ROPE_FREQS], file)
        scaled = not torch.all(freqs == 1)  # all ones means no scaling at all
        rope_scaling = llama3_rope_scaling(freqs, config["rope_theta"], head_dim) if scaled else None
        if scaled and rope_scaling is None:
            raise CheckpointError(f"GGUF file {file}: {_ROPE_FREQS} does not match any Llama-3 rope scaling")
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _deepseek2_config(reader: GGUFFile, tensors: dict, file: Path) -> dict:
    """The DeepSeek-V3 keys of a deepseek2 file: MLA's ranks and head sizes, the MoE's shape and routing.

    A file in llama.cpp's MLA form (key_length_mla set, attn_k_b/attn_v_b tensors) lists one KV head of the latent
    width as its key/value lengths; the legacy form (attn_kv_b) lists the per-head sizes there."""
    def get(key: str, default=None):
        return reader.get(f"deepseek2.{key}", default)

    gating = get("expert_gating_func", 1)  # llama.cpp reads a file without it as DeepSeek-V2's softmax
    if get("expert_count", 0) and gating != 2:
        raise CheckpointError(f"GGUF file {file}: deepseek2 expert_gating_func {gating} (softmax, DeepSeek-V2) is "
                              "not supported; DeepSeek-V3 routes with sigmoid (2)")
    rope = get("rope.dimension_count")
    key, value = get("attention.key_length_mla"), get("attention.value_length_mla")
    if key is None:
        key, value = get("attention.key_length"), get("attention.value_length")
    if rope is None or key is None or value is None:
        raise CheckpointError(f"GGUF file {file} lacks deepseek2 rope.dimension_count or attention key/value lengths")
    n_head = get("attention.head_count")
    n_layer = get("block_count") - get("nextn_predict_layers", 0)
    n_expert = get("expert_count", 0)
    out = {
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_head,  # HF's MLA lists every head; the file's 1 is the absorbed (MQA) form
        "head_dim": rope,
        "q_lora_rank": get("attention.q_lora_rank") or None,
        "kv_lora_rank": get("attention.kv_lora_rank"),
        "qk_nope_head_dim": key - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": value,
        "rope_interleave": True,  # llama.cpp's deepseek2 rope rotates adjacent pairs
        "n_routed_experts": n_expert or None,
        "n_shared_experts": get("expert_shared_count", 0) or None,
        "moe_intermediate_size": get("expert_feed_forward_length", 0),
        "num_experts_per_tok": get("expert_used_count", 0) or None,
        "n_group": get("expert_group_count", 1),
        "topk_group": get("expert_group_used_count", 1),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "routed_scaling_factor": get("expert_weights_scale", 1.0),
        "first_k_dense_replace": get("leading_dense_block_count", 0) if n_expert else n_layer,
        "num_nextn_predict_layers": 0,  # MTP blocks are not loaded: inference does not use them
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "attention_bias": False,
    }
    log_mul = get("rope.scaling.yarn_log_multiplier")
    if log_mul:
        out["_yarn_mscale_all_dim"] = round(log_mul / 0.1, 6)  # llama.cpp stores 0.1 * mscale_all_dim
    return out


def _rope_scaling(reader: GGUFFile, arch: str) -> dict | None:
    """``rope_scaling`` from ``{arch}.rope.scaling.*`` metadata (linear, yarn), if any."""
    kind = reader.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": reader.get(f"{arch}.rope.scaling.factor", 1.0)}
    original = reader.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = reader.get(f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def llama3_factors(scaling: dict, rope_theta: float, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of the Llama-3 rope scheme (what llama.cpp stores as rope_freqs)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < original / high, torch.ones_like(factors), factors)
    return torch.where(wavelen > original / low, torch.full_like(factors, factor), factors)


def llama3_rope_scaling(freqs: torch.Tensor, rope_theta: float, head_dim: int) -> dict | None:
    """Recover HF's ``llama3`` rope_scaling from llama.cpp's rope_freqs, or None.

    Tries the published Llama-3.1 values first, then fits the two free numbers of
    the smooth ramp (its position depends only on ratios, so low_freq_factor is
    pinned to 1). A candidate counts only if it reproduces every stored factor.
    """
    freqs = freqs.double().flatten()
    factor = float(str(np.float32(freqs.max())))  # the stored float32, in short decimal form
    if factor <= 1.0 or len(freqs) != head_dim // 2:
        return None
    candidates = [
        {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    ]
    # On the ramp: 1/f = (1 - s)/factor + s with s = original/wavelen - 1 (low = 1) scaled by 1/(high - 1).
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ramp = (freqs > 1 + 1e-4) & (freqs < factor * (1 - 1e-4))
    if int(ramp.sum()) >= 2:
        s = (1 / freqs[ramp] - 1 / factor) / (1 - 1 / factor)
        x = inv_freq[ramp] / (2 * math.pi)  # 1 / wavelen
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)  # s = slope * x + intercept
        if intercept < 0:
            span = -1 / intercept  # high - low
            candidates.append(
                {
                    "factor": factor,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": round(1 + span, 4),
                    "original_max_position_embeddings": int(round(slope * span)),
                }
            )
    for scaling in candidates:
        if torch.allclose(llama3_factors(scaling, rope_theta, head_dim), freqs, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", **scaling}
    return None
