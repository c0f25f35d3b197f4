"""The decode step as one native call (sputnik/kernels/decode.cpp) for Llama-family models on the CPU.

At batch 1 an eager PyTorch step is ~20 small operators per layer around the matrix products, and dispatching them
costs more than the products: llama.cpp's lead. Where the model is a Llama-family one (Llama, Qwen2, Qwen3: dense
attention, SwiGLU) with every projection a QuantLinear or a plain float32 or bfloat16 Linear on the CPU, its layers
run in C++ over the same weights (float32 / bfloat16 rows read as F32 / BF16 blocks, or by ATen's GEMM past four rows)
and the same cache (float32, bfloat16 or float16: the engine's); activations stay float32 throughout. The
embedding and the rotary tables stay sputnik.model's own, and so does the output head but for a dense one at up to
four rows (decode.cpp's threshold too), which the kernels' rows take in half MKL's time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sputnik import kernels
from sputnik.kernels import QuantLinear
from sputnik.model import MLP, Attention, Transformer


# a dense Linear's rows: F32 / BF16 to the kernels, ATen's GEMM past a few tokens (decode.cpp's kDense, kDenseBf16)
DENSE = {torch.float32: -1, torch.bfloat16: -2}
HEAD_TYPES = {torch.float32: kernels.TYPE_IDS["F32"], torch.bfloat16: kernels.TYPE_IDS["BF16"]}
CACHES = (torch.float32, torch.bfloat16, torch.float16)  # the cache dtypes the step reads and writes


def _group(fused, *layers: nn.Module) -> tuple[list[Tensor], list[int], Tensor | None]:
    """Rows, types and bias of projections that share one input, as the kernels take them. A dense Linear gives
    its own memory read as bytes (type DENSE) — or, once fused, the matrix the model fused the group into (see
    model.fuse_linears) — so the step reads what a trainer writes into them; a block layer gives its rows of blocks."""
    if isinstance(fused, tuple):
        w = fused[0].detach()
        return [w.view(torch.uint8)], [DENSE[w.dtype]], None if fused[1] is None else fused[1].detach()
    rows = [(m.qweight, m.qtype) if type(m) is QuantLinear else (m.weight.detach().view(torch.uint8),
                                                                  DENSE[m.weight.dtype]) for m in layers]
    biases = [m.bias.detach() for m in layers if m.bias is not None]
    bias = (biases[0] if len(biases) == 1 else torch.cat(biases)) if biases else None
    return [r for r, _ in rows], [t for _, t in rows], bias


def _head_rows(model: Transformer) -> tuple[Tensor, int] | None:
    """A plain dense output head's rows as bytes and their type, for the kernels' F32 / BF16 rows at a few tokens: the
    vocabulary's matrix (113 MB for SmolLM2 in float32) is a fifth of the model, and one token's product took MKL
    9.0 ms, the rows 4.1 here."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    w = head.weight.detach()
    return (w.view(torch.uint8), HEAD_TYPES[w.dtype]) if w.is_contiguous() and w.dtype in HEAD_TYPES else None


def _sources(model: Transformer) -> tuple[int, ...]:
    """Where the tensors the step reads live now: a trainer that replaces them (a cast, a reload) moves them."""
    return tuple(t.data_ptr() for layer in model.model.layers
                 for t in (*layer.parameters(), *layer.buffers(), *_fused_tensors(layer))) + \
        tuple(t.data_ptr() for t in model.lm_head.parameters())


def _fused_tensors(layer) -> list[Tensor]:
    return [t for f in (layer.self_attn.qkv, layer.mlp.gate_up) if isinstance(f, tuple) for t in f if t is not None]


def supported(model: Transformer) -> str | None:
    """Why this model cannot take the native step (None: it can)."""
    cfg = model.cfg
    if model.device.type != "cpu" or model.dtype not in DENSE:
        return "only float32 and bfloat16 models on the CPU"
    if cfg.is_mla or model.rotary.interleave:
        return "multi-head latent attention is not in the native step"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention or type(mlp) is not MLP:
            return "mixture-of-experts layers are not in the native step"
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(not (type(m) is QuantLinear or (type(m) is nn.Linear and m.weight.is_contiguous()
                                                and m.weight.dtype in DENSE)) for m in projections):
            return "a projection is neither in a block format nor a plain float32 or bfloat16 Linear (LoRA, experts)"
        if len({m.bias is None for m in projections[:3]}) > 1 or len({m.bias is None for m in projections[4:6]}) > 1:
            return "projections that share an input differ in bias"
    if not kernels.available() or not hasattr(kernels.extension(), "Decoder"):
        return "the kernels are not built here"
    return None


def auto_cache_dtype(model: Transformer, compile: bool = False) -> torch.dtype:
    """The KV cache dtype `--kv-dtype auto` keeps: float16 under a block-format model the native step runs, as
    llama.cpp keeps it (its 8-bit activations round far more than float16 rounds k and v, and a long context costs
    half the bytes; bfloat16's three bits fewer moved greedy tokens further from llama.cpp's), else the model's own
    (exact, and a PyTorch or compiled step would widen a copy of the cache every layer)."""
    blocks = any(type(m) is QuantLinear for m in model.model.layers.modules())
    return torch.float16 if blocks and not compile and supported(model) is None else model.dtype


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
        qkv, gate_up = _group(a.qkv, a.q_proj, a.k_proj, a.v_proj), _group(m.gate_up, m.gate_proj, m.up_proj)
        o, down = _group(None, a.o_proj), _group(None, m.down_proj)
        decoder.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                          a.q_norm.weight.detach() if a.qk_norm else None,
                          a.k_norm.weight.detach() if a.qk_norm else None,
                          *qkv, o[0][0], o[1][0], o[2], *gate_up, down[0][0], down[1][0], down[2])

    head = _head_rows(model)

    def step(tokens: Tensor, positions: Tensor, k: list[Tensor], v: list[Tensor]) -> Tensor:
        B = tokens.shape[0]
        cos, sin = model.rotary(positions)
        x = model.model.embed_tokens(tokens).float().view(B, -1)
        h = decoder.step(x, cos.float().view(B, -1), sin.float().view(B, -1), positions[:, 0], k, v)
        if head is not None and B <= 4:
            return kernels.extension().qmatmul(model.model.norm(h).float(), *head, -1)
        return model.logits(h.to(model.dtype))

    step.sources = _sources(model)
    return step


def refreshed(step, model: Transformer):
    """`step` while the tensors it reads are where they were when it was built; else a step over the model as it is
    now (None if it no longer qualifies): a trainer may have replaced them since (a cast, a reload, new storage)."""
    return step if step.sources == _sources(model) else native_decode(model)
