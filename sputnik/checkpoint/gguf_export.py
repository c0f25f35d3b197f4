"""Write a model as a llama.cpp GGUF file: `sputnik convert MODEL out.gguf --type f16|q8_0|q4_0|q4_k`.

The inverse of sputnik.checkpoint.gguf, following llama.cpp's converter conventions: architecture names llama, qwen2,
qwen3 and deepseek2 (DeepSeek-V3); llama's q/k rows permuted for its pair-wise rope; DeepSeek's experts stacked per
projection and MLA's kv_b_proj split into attn_k_b / attn_v_b (llama.cpp's MLA form, with one latent KV head);
norms, biases and the router in F32; the tokenizer and chat template in the metadata (sputnik.tokenizer.gguf).

Types: every matrix in the chosen type, except that the 4-bit types keep the output head (or the tied embedding it
reads) in Q8_0, as llama.cpp's quantizer keeps it at higher precision; a matrix whose rows do not divide into the
type's blocks falls back to Q4_1 (Q4_K rows need multiples of 256, Q4_1 of 32, which llama.cpp and sputnik's kernels
both run) and then to F16. DeepSeek's multi-token-prediction modules are left out, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from sputnik.checkpoint.gguf import (BLOCK_NAMES, EXPERT_BIAS, EXPERT_NAMES, GLOBAL_NAMES, K_B, V_B,
                                     llama3_factors, permute_rope_rows, split_kv_b)
from sputnik.checkpoint.hf import CheckpointError
from sputnik.checkpoint.quants import quantize_rows
from sputnik.config import ModelConfig

# --type -> (the ggml type of the matrices, the file type llama.cpp records)
EXPORT_TYPES = {
    "f16": ("F16", gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": ("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": ("Q4_0", gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k": ("Q4_K", gguf.LlamaFileType.MOSTLY_Q4_K_S),
}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "deepseek_v3": "deepseek2"}
_BLOCK_SIZE = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "F16": 1}
_HF_TO_PART = {hf: part for part, hf in BLOCK_NAMES.items()}
_HF_TO_GLOBAL = {hf: stem for stem, hf in GLOBAL_NAMES.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ROUTER_BIAS = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


@dataclass
class ExportSummary:
    """What export_gguf wrote: the file, its architecture, how many tensors of each type, its size, and warnings."""

    path: Path
    arch: str
    types: dict[str, int]
    bytes: int
    warnings: list[str] = field(default_factory=list)


def export_gguf(model, tokenizer, path: str | Path, type_name: str = "f16", name: str | None = None) -> ExportSummary:
    """Write `model` (a sputnik Transformer) and its tokenizer as a GGUF file llama.cpp loads."""
    if type_name not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {type_name!r}: use one of {', '.join(EXPORT_TYPES)}")
    cfg: ModelConfig = model.cfg
    arch = check_exportable(cfg)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")  # never leave a half-written file under the real name
    writer = gguf.GGUFWriter(str(tmp), arch)
    write_hparams(writer, cfg, arch, type_name, name or path.stem)
    warnings = _vocab(writer, tokenizer, cfg.vocab_size)
    types: Counter[str] = Counter()
    for gguf_name, tensor in gguf_tensors(cfg, dense_state(model)):
        types[_add(writer, gguf_name, tensor, _pick_type(cfg, gguf_name, tensor, EXPORT_TYPES[type_name][0]))] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return ExportSummary(path, arch, dict(types), path.stat().st_size, warnings)


def requantize_warning(source: str | Path, type_name: str) -> str | None:
    """A warning when a GGUF source's matrices are already at 4-5 bits and --type q4_0 rounds them onto another
    grid: measured on the default model's Q4_1 file, +22% perplexity (q4_k +1%, q8_0 +0.5%: docs/benchmarks.md)."""
    from sputnik.tokenizer.gguf import open_gguf

    if type_name != "q4_0" or Path(source).suffix.lower() != ".gguf":
        return None
    low = {"Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K"}
    found = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in open_gguf(source).tensors} & low)
    if not found:
        return None
    return (f"{Path(source).name}'s matrices are already {'/'.join(found)}: q4_0 rounds them again onto another "
            "grid (the default model's Q4_1 file lost 22% perplexity so; q4_k 1%, q8_0 0.5%); "
            "`sputnik perplexity` measures it on your text")


def _vocab(writer, tokenizer, vocab_size: int) -> list[str]:
    from sputnik.tokenizer.gguf import write_vocab

    try:
        return write_vocab(writer, tokenizer, vocab_size)
    except ValueError as err:
        raise CheckpointError(f"cannot write the tokenizer to GGUF: {err}") from None


def check_exportable(cfg: ModelConfig) -> str:
    """The llama.cpp architecture name for this config; CheckpointError naming what llama.cpp cannot express."""
    arch = ARCHS.get(cfg.family)
    if arch is None:
        raise CheckpointError(f"no GGUF architecture for model family {cfg.family!r}; supported: {', '.join(ARCHS)}")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
    problems = []
    if cfg.family == "deepseek_v3" and (cfg.qkv_bias or cfg.o_bias):
        problems.append("DeepSeek-V3 with attention_bias (llama.cpp's deepseek2 has no attention biases)")
    if cfg.family == "qwen3" and (cfg.qkv_bias or cfg.o_bias):
        problems.append("Qwen3 with attention_bias (llama.cpp's qwen3 has no attention biases)")
    if cfg.mlp_bias:
        problems.append("MLP biases (mlp_bias: llama.cpp's llama reads none)")
    if kind == "llama3" and cfg.family != "llama":
        problems.append(f"llama3 rope scaling on {cfg.family}")
    if kind not in ("default", "linear", "yarn", "llama3"):
        problems.append(f"rope scaling {kind!r}")
    if problems:
        raise CheckpointError(f"cannot write this {cfg.family} model as GGUF: {'; '.join(problems)}")
    return arch


def write_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str, type_name: str, name: str) -> None:
    """The general.* and {arch}.* metadata llama.cpp reads for this config."""
    w.add_name(name)
    w.add_file_type(EXPORT_TYPES[type_name][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.inter_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.is_mla:
        _mla_hparams(w, cfg)
    else:
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
    _rope_scaling(w, cfg)


def _mla_hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """deepseek2 in llama.cpp's MLA form: attention as MQA over the latent (one KV head of kv_lora_rank + rope), the
    per-head sizes as *_mla; the MoE's shape and its sigmoid, group-limited routing."""
    w.add_head_count_kv(1)
    # written even as 0: llama.cpp reads a file without it as a "lite" model only for some layer counts
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.n_layers)
    if cfg.n_routed_experts:
        w.add_expert_feed_forward_length(cfg.moe_inter_dim)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.n_activated_experts)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)


def _rope_scaling(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """linear and yarn as rope.scaling.* keys; llama3 goes in the rope_freqs tensor (see gguf_tensors)."""
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ("linear", "yarn"):
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(s.get("factor", 1.0)))
    if kind == "yarn":
        if s.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        if "beta_fast" in s:
            w.add_rope_scaling_yarn_beta_fast(float(s["beta_fast"]))
        if "beta_slow" in s:
            w.add_rope_scaling_yarn_beta_slow(float(s["beta_slow"]))
        if cfg.is_mla and s.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))  # llama.cpp's convention


def dense_state(model) -> dict[str, Tensor]:
    """The model's module-named weights as float32 (quantized layers dequantized, adapters merged), without the MTP
    modules (inference does not use them) or a tied lm_head."""
    from sputnik.checkpoint import merged_state_dict
    from sputnik.kernels import QuantEmbedding, QuantLinear

    sd = merged_state_dict(model)
    for module_name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            sd.pop(f"{module_name}.qweight")
            sd[f"{module_name}.weight"] = module_weight(module)
    out = {k: v.detach().float().cpu() for k, v in sd.items() if not k.startswith("mtp.")}
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def module_weight(module) -> Tensor:
    from sputnik.kernels import dequantize

    return dequantize(module.qweight, module.qtype, getattr(module, "in_features", None) or module.embedding_dim)


def gguf_tensors(cfg: ModelConfig, sd: dict[str, Tensor]):
    """(GGUF name, float32 tensor in HF shape order) for every tensor of the file, in llama.cpp's layout."""
    experts: dict[tuple[int, str], dict[int, Tensor]] = {}
    if cfg.family == "llama" and (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_factors(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim).float()
    for name, t in sd.items():
        stem, _, suffix = name.rpartition(".")
        if stem in _HF_TO_GLOBAL:
            yield f"{_HF_TO_GLOBAL[stem]}.{suffix}", t
            continue
        bias = _ROUTER_BIAS.match(name)
        if bias:
            yield f"blk.{bias.group(1)}.{EXPERT_BIAS}.bias", t
            continue
        match = _LAYER.match(name)
        if not match:
            raise CheckpointError(f"tensor {name!r} has no GGUF name")
        layer, part, suffix = int(match.group(1)), match.group(2), match.group(3)
        expert = _EXPERT.match(part)
        if expert:
            experts.setdefault((layer, expert.group(2)), {})[int(expert.group(1))] = t
        elif part == "self_attn.kv_b_proj":
            k_b, v_b = split_kv_b(t, cfg.n_heads, cfg.qk_nope_head_dim)
            yield f"blk.{layer}.{K_B}.weight", k_b
            yield f"blk.{layer}.{V_B}.weight", v_b
        elif part in _HF_TO_PART:
            yield f"blk.{layer}.{_HF_TO_PART[part]}.{suffix}", _rope_layout(cfg, part, t)
        else:
            raise CheckpointError(f"tensor {name!r} has no GGUF name for {ARCHS[cfg.family]}")
    stacked = {proj: part for part, proj in EXPERT_NAMES.items()}
    for (layer, proj), per_expert in sorted(experts.items()):
        yield f"blk.{layer}.{stacked[proj]}.weight", torch.stack([per_expert[j] for j in range(len(per_expert))])


def _rope_layout(cfg: ModelConfig, part: str, t: Tensor) -> Tensor:
    """Rows reordered for llama.cpp's pair-wise rope: llama's q/k (HF rotates halves), and DeepSeek's rope rows when
    the checkpoint rotates halves (rope_interleave false); Qwen's NEOX rope and interleaved DeepSeek stay."""
    if cfg.family == "llama" and part == "self_attn.q_proj":
        return permute_rope_rows(t, cfg.n_heads)
    if cfg.family == "llama" and part == "self_attn.k_proj":
        return permute_rope_rows(t, cfg.n_kv_heads)
    if cfg.is_mla and not cfg.rope_interleave:
        if part in ("self_attn.q_proj", "self_attn.q_b_proj"):
            return _pair_rope_part(t, cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim)
        if part == "self_attn.kv_a_proj_with_mqa":
            return _pair_rope_part(t, 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    return t


def _pair_rope_part(t: Tensor, groups: int, plain: int, rope: int) -> Tensor:
    """Rows laid out as `groups` of [plain | rope] rows, the rope rows of each group permuted from halves to pairs."""
    g = t.reshape(groups, plain + rope, *t.shape[1:])
    pe = permute_rope_rows(g[:, plain:].reshape(groups * rope, *t.shape[1:]), groups)
    return torch.cat([g[:, :plain], pe.reshape(groups, rope, *t.shape[1:])], 1).reshape(t.shape)


def _pick_type(cfg: ModelConfig, name: str, t: Tensor, wanted: str) -> str:
    """The ggml type of one tensor (see the module docstring)."""
    if t.dim() == 1 or ".ffn_gate_inp." in name or name == "rope_freqs.weight":
        return "F32"  # norms, biases, the router, rope factors: small, and llama.cpp reads them as F32
    head = name == "output.weight" or (cfg.tie_embeddings and name == "token_embd.weight")
    if wanted in ("Q4_0", "Q4_K") and head:
        wanted = "Q8_0"
    cols = t.shape[-1]
    for candidate in (wanted, "Q4_1" if wanted == "Q4_K" else "F16", "F16"):
        if cols % _BLOCK_SIZE[candidate] == 0:
            return candidate
    return "F16"


def _add(writer: gguf.GGUFWriter, name: str, t: Tensor, type_name: str) -> str:
    data = t.contiguous().numpy()
    if type_name == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif type_name == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quantize_rows(data, type_name), raw_dtype=gguf.GGMLQuantizationType[type_name])
    return type_name
