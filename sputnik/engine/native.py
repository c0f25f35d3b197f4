"""The decode step as one native call (sputnik/kernels/decode.cpp) for models whose weights are all in block formats.

At batch 1 an eager PyTorch step is ~20 small operators per layer around the matrix products, and dispatching them
costs more than the products: llama.cpp's lead. Where the model is a Llama-family one (Llama, Qwen2, Qwen3: dense
attention, SwiGLU) with every projection a QuantLinear on the CPU, its layers run in C++ over the same block
weights and the same cache; the embedding, the rotary tables and the output head stay sputnik.model's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sputnik import kernels
from sputnik.kernels import QuantLinear
from sputnik.model import MLP, Attention, Transformer


def _parts(*layers) -> tuple[list[Tensor], list[int], Tensor | None]:
    """Block rows, types and the joined bias (or None) of projections that share one input."""
    biases = [m.bias for m in layers]
    bias = torch.cat([b.detach().float() for b in biases]) if biases[0] is not None else None
    return [m.qweight for m in layers], [m.qtype for m in layers], bias


def supported(model: Transformer) -> str | None:
    """Why this model cannot take the native step (None: it can)."""
    cfg = model.cfg
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "only float32 models on the CPU"
    if cfg.is_mla or model.rotary.interleave:
        return "multi-head latent attention is not in the native step"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or type(mlp) is not MLP:
            return "mixture-of-experts layers are not in the native step"
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not QuantLinear for m in projections):
            return "not every projection is in a block format"
        if len({m.bias is None for m in projections[:3]}) > 1 or len({m.bias is None for m in projections[4:6]}) > 1:
            return "projections that share an input differ in bias"
    if not kernels.available() or not hasattr(kernels.extension(), "Decoder"):
        return "the kernels are not built here"
    return None


def native_decode(model: Transformer) -> Callable[[Tensor, Tensor, list[Tensor], list[Tensor]], Tensor] | None:
    """A decode step (tokens [B, 1], positions [B, 1], k and v caches per layer) -> logits [B, vocab] running every
    layer natively, or None where the model is not supported (see `supported`)."""
    if supported(model) is not None:
        return None
    cfg = model.cfg
    attn0 = model.model.layers[0].self_attn
    decoder = kernels.extension().Decoder(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, attn0.scale)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv, gate_up = _parts(a.q_proj, a.k_proj, a.v_proj), _parts(m.gate_proj, m.up_proj)
        o, down = _parts(a.o_proj), _parts(m.down_proj)
        decoder.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                          a.q_norm.weight.detach() if a.qk_norm else None,
                          a.k_norm.weight.detach() if a.qk_norm else None,
                          *qkv, o[0][0], o[1][0], o[2], *gate_up, down[0][0], down[1][0], down[2])

    def step(tokens: Tensor, positions: Tensor, k: list[Tensor], v: list[Tensor]) -> Tensor:
        B = tokens.shape[0]
        cos, sin = model.rotary(positions)
        x = model.model.embed_tokens(tokens).float().view(B, -1)
        h = decoder.step(x, cos.view(B, -1), sin.view(B, -1), positions[:, 0], k, v)
        return model.logits(h)

    return step
