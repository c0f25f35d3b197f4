"""The model: one Transformer for Llama, Qwen2, Qwen3 and DeepSeek-V3 (MLA + MoE + MTP).

Parameter names equal Hugging Face's on-disk names, so checkpoints load without a name map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sputnik.config import ModelConfig
from sputnik.kernels import QuantLinears


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own kernel: the same arithmetic in one op (and a one-pass backward), bit-equal in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# Several linears that read the same input as one product: a weight (and bias) of their rows, or block-format layers
# multiplied in one kernel call.
Fused = tuple[Tensor, Tensor | None] | QuantLinears


def fused_linear(x: Tensor, fused: Fused) -> Tensor:
    return fused(x) if isinstance(fused, QuantLinears) else F.linear(x, *fused)


def fuse_linears(fused: Fused | None, *layers: nn.Module) -> Fused | None:
    """Several linears' weights (and biases) as one matrix, for inference; None when they cannot be fused (adapters,
    sharded or mixed weights). Returns `fused` as it is while the layers still share its memory.

    The fused weight does not copy the layers: their weights are re-pointed to row slices of it, so the state dict,
    optimizers and in-place updates see the same memory. Moving or casting the model breaks the sharing; fusing
    again notices and builds a new one. Block-format layers (QuantLinear) are grouped to share one kernel call.
    """
    if any(type(m) is not nn.Linear for m in layers):
        return QuantLinears.of(layers)
    ws = [m.weight for m in layers]
    if isinstance(fused, tuple) and _shares(fused[0], ws):
        return fused
    if any(type(w.data) is not torch.Tensor for w in ws) or len({(w.dtype, w.device) for w in ws}) > 1:
        return None  # (a DTensor: FSDP owns a sharded model's gathered weights, never re-point them)
    biased = [m.bias is not None for m in layers]
    if any(biased) and not all(biased):
        return None
    with torch.inference_mode(False), torch.no_grad():  # params must stay normal tensors, usable for training later
        return _fuse(ws), _fuse([m.bias for m in layers]) if all(biased) else None


def _fuse(params: list[Tensor]) -> Tensor:
    whole = torch.cat([p.detach() for p in params])
    offset = 0
    for p in params:
        p.data = whole[offset : offset + p.shape[0]]
        offset += p.shape[0]
    return whole


def _shares(whole: Tensor, params: list[Tensor]) -> bool:
    """Are the params still row slices of `whole`? (Moving or casting the model gives them new storage.)"""
    if params[0].data_ptr() != whole.data_ptr():
        return False
    end = whole.data_ptr() + whole.numel() * whole.element_size()
    last = params[-1]
    return last.data_ptr() + last.numel() * last.element_size() == end and last.dtype == whole.dtype


# ---------------------------------------------------------------- RoPE


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> tuple[Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor cos/sin are scaled by (YaRN's attention factor)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def correction_dim(n_rot: float) -> float:  # the dim whose wavelength fits n_rot times in old_len
            return dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: high frequency, extrapolate (keep); 0: low frequency, interpolate (divide by factor)
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        if scaling.get("attention_factor") is not None:
            attn_factor = float(scaling["attention_factor"])
        elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attn_factor = yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
        else:
            attn_factor = yarn_mscale(factor)
        return inv_freq, attn_factor
    raise ValueError(f"unsupported rope type {kind!r}")


class Rotary(nn.Module):
    """Full-width cos/sin tables [B, T, dim] for arbitrary positions, computed in fp32 once per forward.

    Laid out for apply_rope's x * cos + swap(x) * sin: halves (Llama, Qwen) or adjacent pairs (DeepSeek checkpoints),
    with the sign of the swapped half folded into sin.
    """

    def __init__(self, dim: int, theta: float, scaling: dict | None, interleave: bool = False):
        super().__init__()
        self.interleave = interleave
        with torch.device("cpu"):  # never on meta, never cast to bf16 with the weights: kept off the buffers
            self.inv_freq, self.attn_factor = rope_frequencies(dim, theta, scaling)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, dim/2]
        cos, sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor
        if self.interleave:
            return cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """Rotate x [B, T, H, D] by Rotary's tables: pairs (x_i, x_{i+D/2}) for halves, (x_2i, x_2i+1) interleaved."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    swapped = x.unflatten(-1, (-1, 2) if interleave else (2, -1)).flip(-1 if interleave else -2).flatten(-2)
    return x * cos + swapped * sin


# ---------------------------------------------------------------- attention


class Cache(Protocol):
    """What a cached forward needs from a KV cache: the engine's KVCache (a batch written at shared slots) and
    SlotView (one decode step, each row at its own length) implement it."""

    def positions(self, T: int) -> Tensor:
        """Positions [B, T] of the next T tokens, for a caller that gives none."""
        ...

    def mask(self, T: int) -> Tensor | None:
        """The next T tokens' attention mask [B, 1, T, S] over every cached slot (True = attend); None: causal."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] at the next slots; return every cached key and value [B, Hkv, S, D]."""
        ...

    def update_latent(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """MLA: write c_kv [B, T, R] and k_pe [B, T, rope]; return every cached [B, S, R], [B, S, rope]."""
        ...

    def advance(self, T: int) -> None:
        """The next T slots are written (called once per forward, after every layer)."""
        ...


def build_mask(B: int, T: int, start: int, key_valid: Tensor | None, device: torch.device | str) -> Tensor | None:
    """Boolean attention mask [B, 1, T, S] (True = attend) for queries at slots start..start+T-1, or None when plain
    causal attention will do (T == S, or one query that may see every key).

    key_valid [B, >= S] marks real keys (False = padding, never attended). Each query may always see itself, so rows
    of padding stay finite.
    """
    if key_valid is None:
        if T == 1 or start == 0:
            return None
        key_valid = torch.ones(B, start + T, dtype=torch.bool, device=device)
    S = start + T
    q_slot = torch.arange(start, S, device=device)[:, None]
    k_slot = torch.arange(S, device=device)[None, :]
    mask = (k_slot <= q_slot)[None] & key_valid[:, None, :S]
    mask |= (k_slot == q_slot)[None]
    return mask[:, None]


def build_doc_mask(doc_ids: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True = attend) for packed rows: a query sees the earlier keys of its
    own document only. key_valid [B, T] (False = padding) also hides pad keys; each query still sees itself."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    mask = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if key_valid is not None:
        mask = (mask & key_valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=doc_ids.device)[None]
    return mask[:, None]


@dataclass
class Unpadded:
    """Padded rows [B, T] run as one row of their real tokens: `index` [N] places each in the flattened [B * T]
    layout, where attention runs (under `mask`, None: causal); every other layer sees only the N real tokens."""

    index: Tensor
    rows: int
    cols: int
    mask: Tensor | None

    @classmethod
    def of(cls, real: Tensor) -> Unpadded:
        """The layout of causal rows whose real tokens are marked by real [B, T] (False = padding)."""
        real = real.bool()
        B, T = real.shape
        mask = build_mask(B, T, 0, None if bool(real.all()) else real, real.device)
        return cls(real.flatten().nonzero().squeeze(1), B, T, mask)

    def select(self, x: Tensor) -> Tensor:
        """[B, T] -> [1, N]: the real tokens' entries, row after row (as x[real] orders them)."""
        return x.flatten()[self.index][None]

    def pad(self, x: Tensor) -> Tensor:
        """[1, H, N, D] -> [B, H, T, D], zeros at the pads."""
        H, D = x.shape[1], x.shape[-1]
        flat = x.new_zeros(self.rows * self.cols, H, D).index_copy_(0, self.index, x[0].transpose(0, 1))
        return flat.view(self.rows, self.cols, H, D).transpose(1, 2)

    def unpad(self, x: Tensor) -> Tensor:
        """[B, H, T, D] -> [1, H, N, D]."""
        H, D = x.shape[1], x.shape[-1]
        return x.transpose(1, 2).reshape(-1, H, D).index_select(0, self.index).transpose(0, 1)[None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | Unpadded | None, scale: float) -> Tensor:
    """SDPA over [B, H, T, D] queries and [B, Hkv, S, D] keys; grouped queries share kv heads without copies.
    mask None is causal attention: T == S, or one query that sees every key."""
    if isinstance(mask, Unpadded):  # rows are padded back for attention only (a few copies, no matmul on pads)
        return mask.unpad(attend(mask.pad(q), mask.pad(k), mask.pad(v), mask.mask, scale))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """Grouped-query attention; Qwen2's q/k/v bias and Qwen3's per-head q/k RMSNorm are switches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.head_dim**-0.5
        self.qkv: Fused | None = None  # q, k and v as one matmul, once fused (see fuse)

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.qkv, self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, mask, cache: Cache | None, layer: int, fused: bool = False) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = fused_linear(x, self.qkv) if fused and self.qkv is not None else None
        if qkv is not None and not self.qk_norm:  # one matmul, one rotation for q and k together
            qkv = qkv.view(B, T, H + 2 * Hkv, D)
            q, k = apply_rope(qkv[:, :, : H + Hkv], cos, sin).split([H, Hkv], 2)
            v = qkv[:, :, H + Hkv :]
        else:
            if qkv is not None:
                q, k, v = qkv.view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], 2)
            else:
                q = self.q_proj(x).view(B, T, H, D)
                k = self.k_proj(x).view(B, T, Hkv, D)
                v = self.v_proj(x).view(B, T, Hkv, D)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLA(nn.Module):
    """Multi-head latent attention. With a cache it keeps only the normed latent c_kv and the shared k_pe per token
    and folds kv_b_proj into the query (keys) and the output (values): the same result as the naive path."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=cfg.o_bias)
        self.scale = qk_dim**-0.5
        s = cfg.rope_scaling or {}
        if s.get("rope_type", s.get("type")) == "yarn" and s.get("mscale_all_dim"):
            self.scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, mask, cache: Cache | None, layer: int, fused: bool = False) -> Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, -1).split([self.nope, self.rope], -1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], -1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe[:, :, None], cos, sin, self.interleave)[:, :, 0]
        if cache is None:
            k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, -1).split([self.nope, self.v_dim], -1)
            q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, self.rope)], -1).transpose(1, 2)
            out = attend(q, k, v.transpose(1, 2), mask, self.scale).transpose(1, 2)
        else:
            c_all, pe_all = cache.update_latent(layer, c_kv, k_pe)  # [B, S, R], [B, S, rope]
            w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
            q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, w[:, : self.nope])
            q = torch.cat([q_lat, q_pe.transpose(1, 2)], -1)
            k = torch.cat([c_all, pe_all], -1)[:, None]
            out = attend(q, k, c_all[:, None], mask, self.scale)  # [B, H, T, R]
            out = torch.einsum("bhtr,hvr->bthv", out, w[:, self.nope :])
        return self.o_proj(out.reshape(B, T, H * self.v_dim))


# ---------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.up_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.down_proj = nn.Linear(inter_dim, dim, bias=bias)
        self.gate_up: Fused | None = None  # gate and up as one matmul, once fused (see fuse)

    def fuse(self) -> None:
        self.gate_up = fuse_linears(self.gate_up, self.gate_proj, self.up_proj)

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if not fused or self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = fused_linear(x, self.gate_up).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class Routing:
    """A router's choice for N tokens: expert ids [N, k] and their weights [N, k] (fp32), taken from every expert's
    sigmoid scores [N, E] (which DeepSeek-V3's balance loss reads)."""

    experts: Tensor
    weights: Tensor
    scores: Tensor


class Gate(nn.Module):
    """DeepSeek-V3 router: sigmoid scores; the correction bias picks experts but does not weight them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.n_activated_experts, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Updated by the aux-loss-free balancing rule, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: Tensor) -> Routing:
        """x [N, dim] -> the experts of each token."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_score = grouped.topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, -1).indices, True)
            # -inf, not 0: a negative bias must never let a dropped group win.
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        idx = choice.topk(self.top_k, -1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(idx, weights * self.scaling, scores)


class MoE(nn.Module):
    """Routed experts (top-k of n) plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        route = self.gate(x)
        idx, weights = route.experts, route.weights
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts))
        out = torch.zeros_like(x)
        order = idx.flatten().argsort(stable=True)
        token_of = order // idx.shape[1]
        w_of = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            tok = token_of[start : start + n]
            y = self.experts[e](x[tok], fused) * w_of[start : start + n, None].to(x.dtype)
            out.index_add_(0, tok, y)
            start += n
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, fused)
        return out.view(shape)


# ---------------------------------------------------------------- blocks and the model


class Block(nn.Module):
    """Pre-norm residual block: attention, then MLP or MoE."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = MLA(cfg) if cfg.is_mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.dim, cfg.inter_dim, cfg.mlp_bias)

    def forward(self, x, cos, sin, mask, cache: Cache | None = None) -> Tensor:
        # Cached inference (the engine, which fuses at its start) uses fused weights; autograd never does.
        fused = cache is not None and not torch.is_grad_enabled()
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer, fused)
        return x + self.mlp(self.post_attention_layernorm(x), fused)


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output projection is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class MTPLayer(Block):
    """DeepSeek-V3 multi-token prediction module k: combine h_i with the embedding of t_{i+k}, run one block."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h: Tensor, emb: Tensor, cos, sin, mask) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(the next depth's states, their shared_head norm for the output head): both inside this module's call, so
        a sharded (FSDP) module gathers its weights once."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], -1))
        h = super().forward(x, cos, sin, mask)
        return h, self.shared_head.norm(h)


class Decoder(nn.Module):
    """Embedding, blocks and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A skeleton on the meta device skips the N(0, 1) draw: meta normal_ runs through torch._refs, which imports
        # torch._dynamo (~70 MB resident, seconds) to draw nothing. Linear's uniform init has a plain meta kernel.
        meta = torch.get_default_device().type == "meta"
        weight = torch.empty(cfg.vocab_size, cfg.dim) if meta else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM for every family: forward(tokens, positions, cache) -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # DeepSeek-V3's MTP modules: trained by pretraining (sputnik.train.pretrain), unused in inference.
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
        self.rotary = Rotary(rope_dim, cfg.rope_theta, cfg.rope_scaling, interleave=cfg.is_mla and cfg.rope_interleave)

    # Read off the final norm: lm_head may be a quantized layer with no float weight (sputnik.kernels).
    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def hidden(self, tokens: Tensor, positions: Tensor | None = None, cache: Cache | None = None,
               mask: Tensor | Unpadded | None = None) -> Tensor:
        """The last block's output [B, T, dim], before the final norm, for tokens [B, T] at positions [B, T].

        mask: None for causal rows; a boolean [B, 1, T, T] mask (True = attend: build_mask for padded rows,
        build_doc_mask for packed documents); or an Unpadded layout, which runs every layer but attention on the real
        tokens only and returns [1, N, dim]. With a cache the tokens are written at its next slots and attend to what
        it holds: it gives the mask (the engine marks padding there) and the default positions.
        """
        B, T = tokens.shape
        if cache is not None:
            if mask is not None:
                raise ValueError("a cached forward takes its mask from the cache")
            positions = cache.positions(T) if positions is None else positions
            mask = cache.mask(T)
        elif positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if isinstance(mask, Unpadded):
            tokens, positions = mask.select(tokens), mask.select(positions)
        cos, sin = self.rotary(positions)
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return h

    def logits(self, h: Tensor) -> Tensor:
        """The output head over hidden() states: final norm, then lm_head."""
        return self.lm_head(self.model.norm(h))

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: Cache | None = None,
                mask: Tensor | Unpadded | None = None) -> Tensor:
        """Logits [B, T, vocab] (see hidden for the arguments)."""
        return self.logits(self.hidden(tokens, positions, cache, mask))

    def fuse(self) -> None:
        """Fuse each layer's q/k/v and gate/up weights for cached inference (the engine calls this once, at its
        start). Calling again re-fuses only what moved; layers wrapped by adapters (LoRA) or sharded stay unfused."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse()
