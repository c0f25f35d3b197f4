"""Per-token log-probs and completion masks: the one place GRPO, distillation and eval get them from.

Column t of `token_logprobs` is log p(tokens[t + 1] | tokens[:t + 1]), so for a prompt of length P the completion
tokens tokens[P:] are scored by columns P - 1 onwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sputnik.model import Transformer


def positions_from_mask(attn_mask: Tensor) -> Tensor:
    """Positions for left-padded rows: each real token's index among the real tokens (pads get 0)."""
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_logprobs(model: Transformer, h: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy for one chunk of hidden states [B, c, dim], in fp32."""
    logits = model.lm_head(model.model.norm(h)).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    # Entropy is for logging only: no graph. H = lse - sum(p * logits).
    with torch.no_grad():
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, ent


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
    attn_mask [B, T] (True = real token) allows left padding; positions then default to the real-token index,
    so padded and unpadded rows give equal log-probs. Only columns t >= start are computed (start: int, or one
    per row [B]); the others are 0. Pass start = P - 1 to score just the completion after a P-token prompt.
    The lm_head runs `chunk` positions at a time, and under autograd each chunk is recomputed in backward,
    so the fp32 [B, T, V] logits never exist at once. entropy=True also returns the tempered distribution's
    per-token entropy [B, T - 1] (detached, 0 where not computed).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = tokens.shape
    if positions is None and attn_mask is not None:
        positions = positions_from_mask(attn_mask)
    h = model.hidden(tokens, positions, attn_mask=attn_mask)[:, :-1]
    targets = tokens[:, 1:]
    n = T - 1

    row_start = None
    if isinstance(start, Tensor):
        row_start = start.to(tokens.device).view(B, 1)
        first = int(start.min()) if start.numel() else 0
    else:
        first = int(start)
    first = max(0, min(first, n))

    logp = torch.zeros(B, n, dtype=torch.float32, device=tokens.device)
    ent = torch.zeros(B, n, dtype=torch.float32, device=tokens.device)
    pieces, ents = [], []
    # Recompute each chunk in backward instead of keeping its fp32 logits alive for it.
    recompute = torch.is_grad_enabled() and h.requires_grad
    for c0 in range(first, n, chunk):
        c1 = min(c0 + chunk, n)
        if recompute:
            lp, en = checkpoint(_chunk_logprobs, model, h[:, c0:c1], targets[:, c0:c1], temperature,
                                use_reentrant=False)
        else:
            lp, en = _chunk_logprobs(model, h[:, c0:c1], targets[:, c0:c1], temperature)
        pieces.append(lp)
        ents.append(en)
    if pieces:
        # cat keeps one graph; the skipped prompt columns stay constant 0.
        logp = torch.cat([logp[:, :first], *pieces], dim=1)
        ent = torch.cat([ent[:, :first], *ents], dim=1)
    if row_start is not None:
        keep = torch.arange(n, device=tokens.device)[None, :] >= row_start
        logp = logp * keep
        ent = ent * keep
    return (logp, ent) if entropy else logp


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
