"""ModelConfig: one dataclass of arguments for every model family sputnik runs (Llama, Qwen2, Qwen3, DeepSeek-V3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "deepseek_v3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Every shape and switch of the model; HF config.json converts both ways."""

    family: str = "llama"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    inter_dim: int = 1376
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # RoPE: theta, and HF's rope_scaling dict ({"rope_type": "yarn", "factor": ...}) or None.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    # Dense attention extras: Qwen2 has q/k/v bias, Llama's attention_bias puts bias on o_proj as well, Qwen3 q/k norm.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # DeepSeek-V3 multi-head latent attention.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # DeepSeek-V3 mixture of experts (layers >= first_k_dense_replace).
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_inter_dim: int = 0
    n_activated_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    # Multi-token prediction modules (kept for training, skipped at inference).
    n_mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # HF keys we do not use, carried through to_hf_config

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a transformers config.json dict (v4 `rope_scaling` or v5 `rope_parameters`)."""
        hf = dict(hf)
        family = hf.get("model_type", "llama")
        if family == "mistral":
            family = "llama"  # same graph; sliding windows are not used by mistral's later releases
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope = dict(rope)
        rope_theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        kind = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if kind == "default" else {**rope, "rope_type": kind}
        n_heads = hf["num_attention_heads"]
        kw: dict[str, Any] = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            inter_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        bias = bool(hf.get("attention_bias", False))
        if family == "qwen2":
            kw.update(qkv_bias=True)
        elif family == "qwen3":
            kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
        elif family == "llama":
            kw.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
        else:  # deepseek_v3
            if hf.get("scoring_func", "sigmoid") != "sigmoid":
                raise ValueError(f"unsupported scoring_func {hf['scoring_func']!r}; DeepSeek-V3 uses sigmoid")
            kw.update(
                qkv_bias=bias,
                o_bias=bias,
                head_dim=hf.get("v_head_dim", 128),
                q_lora_rank=hf.get("q_lora_rank"),
                kv_lora_rank=hf["kv_lora_rank"],
                qk_nope_head_dim=hf["qk_nope_head_dim"],
                qk_rope_head_dim=hf["qk_rope_head_dim"],
                v_head_dim=hf["v_head_dim"],
                rope_interleave=hf.get("rope_interleave", True),
                n_routed_experts=hf.get("n_routed_experts") or 0,
                n_shared_experts=hf.get("n_shared_experts") or 0,
                moe_inter_dim=hf.get("moe_intermediate_size", 0),
                n_activated_experts=hf.get("num_experts_per_tok") or 0,
                n_group=hf.get("n_group") or 1,
                topk_group=hf.get("topk_group") or 1,
                norm_topk_prob=hf.get("norm_topk_prob", True),
                routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                n_mtp_layers=hf.get("num_nextn_predict_layers", 0) or 0,
            )
        known = {"model_type", "architectures", "rope_parameters", "rope_scaling", "rope_theta"}
        kw["extra"] = {k: v for k, v in hf.items() if k not in known and not k.startswith("_")}
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers (v4 and v5) loads as the matching *ForCausalLM."""
        hf: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in ("transformers_version", "dtype")}
        hf.update(
            architectures=[ARCHITECTURES[self.family]],
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            intermediate_size=self.inter_dim,
            rms_norm_eps=self.norm_eps,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.family == "llama":
            hf.update(head_dim=self.head_dim, attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.family == "qwen2":
            hf.update(use_sliding_window=False)
        elif self.family == "qwen3":
            hf.update(head_dim=self.head_dim, attention_bias=self.qkv_bias)
        else:
            hf.update(
                attention_bias=self.qkv_bias,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                head_dim=self.qk_rope_head_dim,
                rope_interleave=self.rope_interleave,
                n_routed_experts=self.n_routed_experts,
                n_shared_experts=self.n_shared_experts,
                moe_intermediate_size=self.moe_inter_dim,
                num_experts_per_tok=self.n_activated_experts,
                n_group=self.n_group,
                topk_group=self.topk_group,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
                first_k_dense_replace=self.first_k_dense_replace,
                num_nextn_predict_layers=self.n_mtp_layers,
                scoring_func="sigmoid",
                topk_method="noaux_tc",
            )
        return hf

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
