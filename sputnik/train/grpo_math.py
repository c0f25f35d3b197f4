"""GRPO's arithmetic as pure functions: group advantages, the clipped policy loss and its aggregations.

Conventions (TRL's, so runs compare with TRL's numbers):
- Advantages: A = r - mean(group); "group" divides by the group's sample std (Bessel-corrected, torch's default
  `std()`) + eps with eps = 1e-4, "batch" by the whole batch's sample std + eps, "none" not at all (Dr. GRPO).
  Groups whose rewards are all equal get A = 0 exactly.
- Loss types: grpo (mean over sequences of each one's token mean), bnpo (token mean), dr_grpo (token sum /
  (sequences x max_completion_length)), dapo (token sum / active tokens of the whole step).
- Micro-batching: pass the step's global counts (see `policy_loss`) and sum the micro-batch losses; the sum then
  equals the loss of the whole step computed at once, value and gradient, for every loss type.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ---------------------------------------------------------------- advantages


def _groups(rewards: Tensor, G: int) -> Tensor:
    if G < 1 or rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {G}")
    return rewards.float().view(-1, G)


def zero_std_groups(rewards: Tensor, G: int) -> Tensor:
    """[N / G] bool: groups whose rewards are all equal (they carry no learning signal)."""
    grouped = _groups(rewards, G)
    return grouped.amax(1) == grouped.amin(1)


def zero_std_fraction(rewards: Tensor, G: int) -> float:
    """Fraction of groups whose rewards are all equal: log it, it is the share of wasted samples."""
    return zero_std_groups(rewards, G).float().mean().item()


def group_advantages(rewards: Tensor, G: int, scale: Scale = "group", eps: float = 1e-4) -> Tensor:
    """Advantages [N] for rewards [N] laid out as contiguous groups of G samples of the same prompt.

    Rewards must already be gathered across ranks (a group's mean and std need all of it).
    """
    grouped = _groups(rewards, G)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        # G == 1 has no sample std (NaN); its advantage is 0 anyway.
        std = grouped.std(1, keepdim=True) if G > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    elif scale == "batch":
        std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        adv = adv / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}: group, batch or none")
    # A float mean of equal values can be off by one ulp; force exact zeros for tied groups.
    tied = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)
    return torch.where(tied, torch.zeros_like(adv), adv).view(-1)


# ---------------------------------------------------------------- policy loss


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = ref - logp; >= 0, 0 where they agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    loss_type: LossType = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = 0.2,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    importance: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    num_sequences_in_batch: int | None = None,
    rollout_logp: Tensor | None = None,
    rollout_is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss (to minimise) over completions [B, L] and its metrics.

    Per token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3, with rho = exp(logp - old_logp)
    (old_logp None = logp detached: one update per rollout, rho = 1, plain REINFORCE with the group baseline).
    KL is added only when beta > 0 and ref_logp is given (its mean is logged whenever ref_logp is given).

    importance="sequence" is GSPO: s_i = exp(masked mean over o_i of (logp - old_logp)), and every token of o_i uses
    sg[s_i] * exp(logp - sg[logp]), whose value is s_i and whose gradient is s_i * grad(logp_t) (GSPO-token with
    a per-sequence advantage; it equals GSPO's gradient under every aggregation). GSPO's setting: loss_type
    "grpo" (then the loss is the mean over sequences of -min(s_i A_i, clip(s_i) A_i)), epsilon 3e-4 / 4e-4, beta 0.

    rollout_logp: the log-probs of the model that sampled, when it is not the policy (a quantized copy). The tokens
    then come from another distribution than old_logp's, and each token's policy term is weighted by
    min(exp(old_logp - rollout_logp), rollout_is_cap), detached: truncated importance sampling (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). The KL term is not weighted.

    Aggregation, and what makes it independent of the micro-batch split (defaults = this micro-batch's counts):
      grpo     sum over sequences of their masked token mean / num_sequences_in_batch
      bnpo     masked token sum / num_items_in_batch
      dr_grpo  masked token sum / (num_sequences_in_batch * max_completion_length)  (length default: L)
      dapo     masked token sum / num_items_in_batch
    Pass num_sequences_in_batch = sequences in the whole optimizer step and num_items_in_batch = active
    (mask = 1) tokens in the whole step, both counted over all micro-batches and ranks, then SUM the micro-batch
    losses (no extra division by accumulation steps). With the defaults, bnpo is TRL's per-micro-batch token
    mean and grpo/dr_grpo/dapo are the micro-batch's own means. Under DDP, which averages gradients over ranks,
    multiply the loss by the world size (or divide the normalisers by it).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: one of {LOSS_TYPES}")
    if importance not in ("token", "sequence"):
        raise ValueError(f"unknown importance {importance!r}: token or sequence")
    eps_low = epsilon_low
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    active = mask > 0
    adv = advantages.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    if old_logp is None:
        old_logp = logp.detach()
    zero = torch.zeros_like(logp)

    ratio, seq_ratio = _ratios(logp, old_logp, mask, importance)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    is_log_ratio = None
    if rollout_logp is not None:
        is_log_ratio = torch.where(active, old_logp.detach() - rollout_logp, zero)
        per_token = per_token * torch.exp(is_log_ratio).clamp(max=rollout_is_cap)

    kl = None
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(active, ref_logp, logp.detach()))
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(active, per_token, zero) * mask

    loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch, num_sequences_in_batch)
    metrics = _metrics(ratio, adv, mask, eps_low, eps_high, kl, seq_ratio)
    if is_log_ratio is not None:
        metrics.update(_is_metrics(is_log_ratio, mask, rollout_is_cap))
    return loss, metrics


def _ratios(logp: Tensor, old_logp: Tensor, mask: Tensor, importance: str) -> tuple[Tensor, Tensor | None]:
    """Per-token importance ratios [B, L] (GSPO's: each sequence's, with the token's gradient) and, for GSPO, the
    sequences' ratios [B] for the metrics."""
    active, zero = mask > 0, torch.zeros_like(logp)
    # Masked slots may hold anything (pads, -inf): keep them out of every exp.
    log_ratio = torch.where(active, logp - old_logp, zero)
    if importance != "sequence":
        return torch.exp(log_ratio), None
    seq_log_ratio = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)
    log_ratio = torch.where(active, seq_log_ratio.detach()[:, None] + logp - logp.detach(), zero)
    return torch.exp(log_ratio), seq_log_ratio.detach().exp()


def _aggregate(per_token: Tensor, mask: Tensor, loss_type: LossType, max_completion_length: int | None,
               num_items_in_batch: float | None, num_sequences_in_batch: int | None) -> Tensor:
    """The loss type's reduction of masked per-token losses [B, L] (see `policy_loss`)."""
    B, L = per_token.shape
    if loss_type == "grpo":
        seqs = num_sequences_in_batch if num_sequences_in_batch is not None else B
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(seqs, 1)
    if loss_type == "dr_grpo":
        seqs = num_sequences_in_batch if num_sequences_in_batch is not None else B
        length = max_completion_length if max_completion_length is not None else L
        return per_token.sum() / max(seqs * length, 1)
    # bnpo, dapo: token sum over the step's active tokens
    items = num_items_in_batch if num_items_in_batch is not None else mask.sum().item()
    return per_token.sum() / max(float(items), 1.0)


def _metrics(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
             kl: Tensor | None, seq_ratio: Tensor | None) -> dict[str, float]:
    """Token means over the micro-batch's active tokens (python floats, for logging)."""
    with torch.no_grad():
        ratio, mask = ratio.detach(), mask.detach()
        n = mask.sum().clamp(min=1)

        def mean(x: Tensor) -> float:
            return ((x.float() * mask).sum() / n).item()

        # Clipping is active where it zeroes the token's gradient: above the band with A > 0, below with A < 0.
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        out = {"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio": mean(low | high),
               "ratio": mean(ratio)}
        if kl is not None:
            out["kl"] = mean(kl.detach())
        if seq_ratio is not None:
            has_tokens = mask.sum(1) > 0
            out["seq_ratio"] = seq_ratio[has_tokens].mean().item() if bool(has_tokens.any()) else 1.0
    return out


def _is_metrics(log_ratio: Tensor, mask: Tensor, cap: float) -> dict[str, float]:
    """Truncated importance sampling over the active tokens: the mean weight, the share of tokens the cap cut, and
    the mean |log(policy / sampler)| (how far the sampler is from the policy)."""
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        log_ratio = log_ratio.float()

        def mean(x: Tensor) -> float:
            return ((x.float() * mask).sum() / n).item()

        return {"rollout_is/weight": mean(log_ratio.exp().clamp(max=cap)),
                "rollout_is/capped": mean(log_ratio.exp() > cap),
                "rollout_is/abs_log_ratio": mean(log_ratio.abs())}
