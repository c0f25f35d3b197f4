"""Per-token log-probs and completion masks: the one place GRPO, SFT, distillation and eval get them from.

Column t of `token_logprobs` is log p(tokens[t + 1] | tokens[:t + 1]), so for a prompt of length P the completion
tokens tokens[P:] are scored by columns P - 1 onwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sputnik.model import Transformer, Unpadded


def positions_from_mask(attn_mask: Tensor) -> Tensor:
    """Positions for left-padded rows: each real token's index among the real tokens (pads get 0)."""
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)


def _tempered_probs(h: Tensor, weight: Tensor, targets: Tensor, temperature: float, dtype: torch.dtype,
                    entropy: bool, top: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """p = softmax(h W^T / T) [N, V] in fp32, log p[target] [N] and (optionally) the entropy [N] (see
    _logits_probs, which does the work on the logits)."""
    return _logits_probs(F.linear(h.to(dtype), weight.to(dtype)).float(), targets, temperature, entropy, top)


def _logits_probs(z: Tensor, targets: Tensor, temperature: float, entropy: bool, top: int = 0
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """p = softmax(z / T) [N, V] for fp32 logits z (overwritten), log p[target] [N] and (optionally) the entropy
    [N]. With top > 0 the third value is instead the `top` largest log-probs and their ids ([N, top] each), computed
    exactly as log p[target] is, so a target that is the most likely token has the same value in both.

    Works in place on two [N, V] buffers: on a CPU every fresh buffer of that size costs as much in page faults
    as the arithmetic done on it."""
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(z.amax(-1, keepdim=True))
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = torch.exp(z)
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    log_total = total.log().squeeze(-1)
    ent = log_total - torch.linalg.vecdot(p, z) if entropy else None  # H = log sum e^z - sum p z (z shifted)
    if top:
        vals, idx = z.topk(top, -1)
        return p, picked - log_total, (vals - log_total[:, None], idx)
    return p, picked - log_total, ent


class _HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] and the entropy, for hidden states h [N, dim] and the head's weight [V, dim].

    Autograd through matmul, logsumexp and gather would keep several [N, V] tensors and pass over each; this keeps
    the probabilities p only (or nothing, recomputing them chunk by chunk in backward when they would not fit
    `keep_bytes`), and the backward is d logits = g (onehot - p) / T."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int,
                keep_bytes: int) -> tuple[Tensor, Tensor]:
        # Under autocast the head runs in the autocast dtype; the backward reuses it (autocast is off there).
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        N = h.shape[0]
        keep = N * weight.shape[0] * 4 <= keep_bytes
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N, dtype=torch.float32, device=h.device)
        probs = []
        for c0 in range(0, N, chunk):
            p, logp[c0 : c0 + chunk], ent[c0 : c0 + chunk] = _tempered_probs(
                h[c0 : c0 + chunk], weight, targets[c0 : c0 + chunk], temperature, dtype, entropy=True)
            if keep:
                probs.append(p)
        ctx.save_for_backward(h, weight, targets, *probs)
        ctx.args = temperature, chunk, dtype
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g: Tensor, _g_ent: Tensor):
        h, weight, targets, *probs = ctx.saved_tensors
        temperature, chunk, dtype = ctx.args
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        # beta 0 on the first chunk: it writes the [V, dim] gradient, the others add to it (no zero-fill pass)
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        if grad_w is not None and h.shape[0] == 0:
            grad_w.zero_()  # no chunk will write it
        w = weight.to(dtype)
        for i, c0 in enumerate(range(0, h.shape[0], chunk)):
            hc, tc = h[c0 : c0 + chunk], targets[c0 : c0 + chunk]
            p = probs[i] if probs else _tempered_probs(hc, weight, tc, temperature, dtype, entropy=False)[0]
            scale = g[c0 : c0 + chunk].unsqueeze(-1) / temperature
            d = p.mul_(-scale)  # p is not needed again: its memory becomes the logits' gradient
            d.scatter_add_(-1, tc.unsqueeze(-1), scale)
            d = d.to(dtype)
            if want_h:
                grad_h[c0 : c0 + chunk] = d @ w
            if want_w:
                grad_w.addmm_(d.T.float(), hc.float(), beta=0 if i == 0 else 1)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def head_logprobs(model: Transformer, h: Tensor, targets: Tensor, temperature: float = 1.0, chunk: int = 1024,
                  keep_bytes: int = 2**30) -> tuple[Tensor, Tensor]:
    """log p(targets) [N] and entropy [N] (detached) of the tempered next-token distributions at hidden states
    h [N, dim] (the last block's output, before the final norm), in fp32.

    The head runs `chunk` rows at a time; the backward keeps the fp32 probabilities while they fit in keep_bytes
    and recomputes them chunk by chunk otherwise, so [N, V] logits never need to exist at once."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (torch.is_grad_enabled() and h.requires_grad):
        keep_bytes = 0
    return _HeadLogProbs.apply(model.model.norm(h), model.lm_head.weight, targets, temperature, chunk, keep_bytes)


def token_logprobs(
    model: Transformer,
    tokens: Tensor,
    attn_mask: Tensor | None = None,
    positions: Tensor | None = None,
    temperature: float = 1.0,
    start: int | Tensor = 0,
    chunk: int = 1024,
    entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs [B, T - 1] in fp32: column t is log p(tokens[:, t + 1] | tokens[:, :t + 1]).

    Logits are divided by `temperature` before the log-softmax, so rollouts sampled at T score as sampled.
    attn_mask [B, T] (True = real token) allows left and right padding; positions then default to the real-token
    index, so padded and unpadded rows give equal log-probs. With padding, only the real tokens go through the model
    (attention aside) and columns whose next token is a pad are 0. Only columns t >= start are computed (start: int,
    or one per row [B]); the others are 0. Pass start = P - 1 to score just the completion after a P-token prompt.
    The head runs through head_logprobs, `chunk` tokens at a time. entropy=True also returns the tempered distribution's
    per-token entropy [B, T - 1] (detached, 0 where not computed).
    """
    B, T = tokens.shape
    if positions is None and attn_mask is not None:
        positions = positions_from_mask(attn_mask)
    targets = tokens[:, 1:]
    n = T - 1

    row_start = None
    if isinstance(start, Tensor):
        row_start = start.to(tokens.device).view(B, 1)
        first = int(start.min()) if start.numel() else 0
    else:
        first = int(start)
    first = max(0, min(first, n))

    # Only columns that predict a real token from a real one, at or after start, go through the head; the others are
    # 0. With padding the model runs on the real tokens alone (unpad): no matmul is spent on pads.
    real = attn_mask.bool() if attn_mask is not None else torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    unpad = not bool(real.all())
    scored = real[:, :-1] & real[:, 1:]
    scored[:, :first] = False
    if row_start is not None:
        scored &= torch.arange(n, device=tokens.device)[None, :] >= row_start
    at = (real.flatten().cumsum(0) - 1).view(B, T)[:, :-1][scored]  # each scored column's row in h, flattened
    picked = targets[scored]

    # (FSDP: the root keeps the final norm and head gathered after hidden(), for head_logprobs; see loop._shard)
    h = model.hidden(tokens, positions, mask=Unpadded.of(real) if unpad else None)
    lp, en = head_logprobs(model, h.reshape(-1, h.shape[-1])[at], picked, temperature, chunk)
    zeros = torch.zeros(B, n, dtype=torch.float32, device=tokens.device)
    logp, ent = zeros.masked_scatter(scored, lp), zeros.masked_scatter(scored, en)
    return (logp, ent) if entropy else logp


@torch.no_grad()
def scored_logprobs(model: Transformer, ids: list[int], top: int = 0, chunk: int = 1024
                    ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Score a whole sequence, for a server that echoes a prompt with its log-probs: column t is
    log p(ids[t + 1] | ids[:t + 1]) (as token_logprobs, at temperature 1), with the `top` most likely
    (token, log-prob) alternatives at each column. The same softmax as head_logprobs, chunk by chunk, through the
    model's own head (which may be in a block format: sputnik.kernels)."""
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    h = model.hidden(tokens)[0, :-1]
    targets = tokens[0, 1:]
    logps: list[float] = []
    alts: list[list[tuple[int, float]]] = []
    for c0 in range(0, h.shape[0], chunk):
        z = model.logits(h[c0 : c0 + chunk]).float()
        _, lp, best = _logits_probs(z, targets[c0 : c0 + chunk], 1.0, False, top)
        logps += lp.tolist()
        if top:
            vals, idx = best
            alts += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return logps, alts


def completion_mask(
    completion_ids: Tensor, eos_ids: set[int] | int, pad_id: int | None = None
) -> tuple[Tensor, Tensor]:
    """Loss mask [B, L] (float) and truncated [B] (bool) for sampled completions.

    The mask is 1 up to and including the first EOS and 0 after it, so pad == eos (SmolLM2) keeps the real EOS
    and drops the pads after it. A pad id that is not an EOS is masked wherever it appears. A row is truncated
    when it has no EOS and no padding: it ran to the length limit (a row padded without an EOS ended on a stop
    string, which is not truncation).
    """
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    eos_t = torch.tensor(sorted(eos), dtype=completion_ids.dtype, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_t)
    # EOS tokens strictly before each position: > 0 means we are past the first EOS.
    eos_before = is_eos.long().cumsum(1) - is_eos.long()
    keep = eos_before == 0
    has_pad = torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device)
    if pad_id is not None and pad_id not in eos:
        is_pad = completion_ids == pad_id
        keep &= ~is_pad
        has_pad = is_pad.any(1)
    truncated = ~is_eos.any(1) & ~has_pad
    return keep.float(), truncated
