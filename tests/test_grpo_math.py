"""Per-token log-probs, completion masks, group advantages and the GRPO loss family on hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.train.grpo_math import (
    group_advantages,
    kl_k3,
    policy_loss,
    zero_std_fraction,
    zero_std_groups,
)
from sputnik.train.logprobs import completion_mask, head_logprobs, token_logprobs

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=48,
                      max_seq_len=128)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- token_logprobs


def test_logprobs_equal_minus_nll(model, tokens):
    with torch.no_grad():
        logits = model(tokens)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1), reduction="none").view(2, 11)
        logp = token_logprobs(model, tokens)
    assert logp.shape == (2, 11) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, -nll, atol=1e-5, rtol=1e-5)
    P = 5  # completion = tokens[:, 5:], scored by columns 4..
    torch.testing.assert_close(logp[:, P - 1:].sum(1), -nll[:, P - 1:].sum(1), atol=1e-5, rtol=1e-5)


def test_left_padding_gives_equal_logprobs(model, tokens):
    pad = 3
    padded = torch.cat([torch.zeros(2, pad, dtype=tokens.dtype), tokens], dim=1)
    attn = torch.ones_like(padded, dtype=torch.bool)
    attn[:, :pad] = False
    with torch.no_grad():
        plain = token_logprobs(model, tokens)
        left = token_logprobs(model, padded, attn_mask=attn)
    torch.testing.assert_close(left[:, pad:], plain, atol=1e-5, rtol=1e-5)
    # Rows with different pad lengths in one batch.
    mixed = padded.clone()
    mixed[1, :pad] = tokens[1, :pad]
    mixed[1, pad:] = torch.cat([tokens[1, pad:], tokens[1, :pad]])  # row 1: 15 real tokens, no padding
    attn2 = attn.clone()
    attn2[1] = True
    with torch.no_grad():
        both = token_logprobs(model, mixed, attn_mask=attn2)
        row1 = token_logprobs(model, mixed[1:])
    torch.testing.assert_close(both[0, pad:], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], row1[0], atol=1e-5, rtol=1e-5)


def test_padded_rows_score_like_each_row_alone(model, tokens):
    """Left and right padding in one batch (the padded rows run unpadded): every column that predicts a real token
    from a real one equals the row scored alone, with equal gradients; columns next to pads are 0."""
    L = 16
    rows = [tokens[0, :12], tokens[1, 2:9], tokens[0, 5:7]]
    lefts = [0, 3, 6]
    batch = torch.zeros(3, L, dtype=tokens.dtype)
    real = torch.zeros(3, L, dtype=torch.bool)
    for b, (r, s) in enumerate(zip(rows, lefts)):
        batch[b, s : s + len(r)], real[b, s : s + len(r)] = r, True
    w = torch.randn(3, L - 1, generator=torch.Generator().manual_seed(5))
    model.zero_grad()
    got = token_logprobs(model, batch, attn_mask=real, start=torch.tensor([0, 4, 6]))
    (got * w).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = torch.zeros(3, L - 1)
    for b, (r, s) in enumerate(zip(rows, lefts)):
        alone = token_logprobs(model, r[None])[0]
        keep = torch.arange(len(r) - 1) + s >= [0, 4, 6][b]
        (alone * keep * w[b, s : s + len(r) - 1]).sum().backward()
        want[b, s : s + len(r) - 1] = (alone * keep).detach()
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert (got[~(real[:, :-1] & real[:, 1:])] == 0).all()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_nothing_scored_gives_zero_gradient(model, tokens):
    """Padding everywhere but one token per row: no column predicts a real token, so every log-prob is 0 and the
    gradient (the head's included) is exactly 0, not uninitialised memory."""
    real = torch.zeros_like(tokens, dtype=torch.bool)
    real[:, 3] = True
    model.zero_grad()
    logp = token_logprobs(model, tokens, attn_mask=real)
    assert logp.shape == (2, 11) and (logp == 0).all()
    (logp.sum() + sum(p.sum() * 0 for p in model.parameters())).backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())
    model.zero_grad()


def test_temperature_divides_logits_before_log_softmax(model, tokens):
    T = 0.7
    with torch.no_grad():
        logits = model(tokens)[:, :-1].float()
        manual = torch.log_softmax(logits / T, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        logp, ent = token_logprobs(model, tokens, temperature=T, entropy=True)
        probs = torch.softmax(logits / T, -1)
        manual_ent = -(probs * torch.log_softmax(logits / T, -1)).sum(-1)
    torch.testing.assert_close(logp, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, manual_ent, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logp, token_logprobs(model, tokens).detach(), atol=1e-3)


def test_fused_backward_matches_autograd(model, tokens):
    """The fused log-softmax backward gives autograd's gradients of log_softmax(logits / T)[target]."""
    T = 0.8
    weights = torch.randn(2, 11)  # an arbitrary upstream gradient, as a policy loss would give
    logp = token_logprobs(model, tokens, temperature=T)
    ours = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
    logits = model(tokens)[:, :-1].float()
    ref = torch.log_softmax(logits / T, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    theirs = torch.autograd.grad((ref * weights).sum(), list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_head_recomputes_in_backward_when_probs_do_not_fit(model, tokens):
    """keep_bytes=0 recomputes each chunk's probabilities in backward: the same values and gradients; and under
    bf16 autocast the head runs in bf16 and still gives fp32 gradients close to fp32's."""
    params = list(model.parameters())
    weights = torch.randn(22)

    def run(keep_bytes):
        h = model.hidden(tokens)[:, :-1].reshape(22, -1)
        lp, ent = head_logprobs(model, h, tokens[:, 1:].reshape(-1), 0.9, chunk=5, keep_bytes=keep_bytes)
        return lp, ent, torch.autograd.grad((lp * weights).sum(), params)

    kept, recomputed = run(2**30), run(0)
    for a, b in zip(kept[:2] + kept[2], recomputed[:2] + recomputed[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _, grads = run(2**30)
    assert lp.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(lp, kept[0], atol=0.1, rtol=0.05)


def test_chunked_equals_unchunked_with_gradients(model, tokens):
    whole = token_logprobs(model, tokens, chunk=1024)
    g_whole = torch.autograd.grad(whole.sum(), model.lm_head.weight)[0]
    chunked = token_logprobs(model, tokens, chunk=3)
    g_chunked = torch.autograd.grad(chunked.sum(), model.lm_head.weight)[0]
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_chunked, g_whole, atol=1e-6, rtol=1e-6)


def test_start_skips_the_prompt(model, tokens):
    with torch.no_grad():
        full = token_logprobs(model, tokens)
        part = token_logprobs(model, tokens, start=4, chunk=3)
        rows = token_logprobs(model, tokens, start=torch.tensor([2, 6]))
    torch.testing.assert_close(part[:, 4:], full[:, 4:], atol=1e-6, rtol=1e-6)
    assert (part[:, :4] == 0).all()
    torch.testing.assert_close(rows[0, 2:], full[0, 2:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rows[1, 6:], full[1, 6:], atol=1e-6, rtol=1e-6)
    assert (rows[0, :2] == 0).all() and (rows[1, :6] == 0).all()


# ---------------------------------------------------------------- completion_mask


def test_completion_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 2, 7, 8],   # EOS at 2: kept, the rest out
                        [5, 6, 7, 8, 9],   # no EOS: truncated
                        [2, 2, 2, 2, 2]])  # EOS first
    mask, truncated = completion_mask(ids, eos_ids=2, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert mask.dtype == torch.float32
    assert truncated.tolist() == [False, True, False]


def test_completion_mask_pad_equals_eos():
    # SmolLM2: pad id 2 == eos id 2; the real EOS stays, the pads after it go.
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 2], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask(ids, eos_ids={2, 3}, pad_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_separate_pad():
    # Ended on a stop string (no EOS) then padded: pads out, not truncated. Second EOS id counts too.
    ids = torch.tensor([[5, 6, 0, 0], [5, 3, 0, 0]])
    mask, truncated = completion_mask(ids, eos_ids={2, 3}, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False]


# ---------------------------------------------------------------- advantages


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_group_advantages_hand_computed():
    half = torch.tensor([0.5, -0.5, -0.5, 0.5])
    group_std = math.sqrt((4 * 0.25) / 3)  # sample std (Bessel), TRL's convention
    a = group_advantages(REWARDS, G=4, scale="group")
    torch.testing.assert_close(a[:4], half / (group_std + 1e-4))
    batch_std = math.sqrt(5.5 / 7)  # mean 1.25, squared deviations sum to 5.5
    b = group_advantages(REWARDS, G=4, scale="batch")
    torch.testing.assert_close(b[:4], half / (batch_std + 1e-4))
    c = group_advantages(REWARDS, G=4, scale="none")
    torch.testing.assert_close(c[:4], half)
    for adv in (a, b, c):
        assert (adv[4:] == 0.0).all()


def test_tied_groups_give_exact_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3, 0.3])
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, G=3, scale=scale)
        assert not torch.isnan(a).any()
        assert (a == 0.0).all()
    assert not torch.isnan(group_advantages(torch.tensor([1.0, 0.0]), G=1)).any()
    assert zero_std_fraction(REWARDS, G=4) == 0.5
    assert zero_std_groups(REWARDS, G=4).tolist() == [False, True]
    with pytest.raises(ValueError):
        group_advantages(REWARDS, G=3)


# ---------------------------------------------------------------- policy loss

# 2 sequences x 3 tokens; token (0, 2) is masked (and holds garbage in old_logp).
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
RATIOS = torch.tensor([[1.5, 0.7, 1.0], [1.3, 1.0, 0.7]])
ADV = torch.tensor([1.0, -0.5])


def example(requires_grad: bool = True):
    old = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -1.5, -2.5]])
    logp = (old.nan_to_num(neginf=-3.0) + RATIOS.log()).clone().requires_grad_(requires_grad)
    return logp, old


def test_loss_types_hand_computed():
    # Per token -min(rho A, clip(rho, 0.8, 1.2) A):
    #   seq 0 (A = 1):    rho 1.5 -> clipped high, -1.2;  rho 0.7 -> -0.7
    #   seq 1 (A = -0.5): rho 1.3 -> 0.65;  rho 1.0 -> 0.5;  rho 0.7 -> clipped low, 0.4
    # Token sum -1.9 + 1.55 = -0.35 over 5 active tokens; sequence means -0.95 and 1.55 / 3.
    expected = {"grpo": (-0.95 + 1.55 / 3) / 2, "bnpo": -0.35 / 5, "dr_grpo": -0.35 / 6, "dapo": -0.35 / 5}
    for loss_type, value in expected.items():
        logp, old = example()
        loss, m = policy_loss(logp, old, ADV, MASK, loss_type=loss_type)
        assert math.isfinite(loss.item())
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
        assert m["clip_ratio/high"] == pytest.approx(0.2)
        assert m["clip_ratio/low"] == pytest.approx(0.2)
        assert m["clip_ratio"] == pytest.approx(0.4)
        assert m["ratio"] == pytest.approx((1.5 + 0.7 + 1.3 + 1.0 + 0.7) / 5, abs=1e-6)
    logp, old = example()
    loss, _ = policy_loss(logp, old, ADV, MASK, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(-0.35 / 8, abs=1e-6)
    # epsilon_high None = epsilon_low; a wider high band unclips rho 1.5 (DAPO's clip-higher).
    logp, old = example()
    loss, m = policy_loss(logp, old, ADV, MASK, loss_type="dapo", epsilon_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.7 + 1.55) / 5, abs=1e-6)
    assert m["clip_ratio/high"] == 0.0


def test_on_policy_ratio_is_one():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    for loss_type in LOSS_TYPES:
        loss, m = policy_loss(logp, logp.detach(), ADV, MASK, loss_type=loss_type)
        assert m["ratio"] == 1.0 and m["clip_ratio"] == 0.0
        # rho = 1: per-token loss is -A. grpo: -mean(A); token means: -(2 * 1 - 3 * 0.5) / 5.
        want = {"grpo": -ADV.mean().item(), "bnpo": -0.5 / 5, "dr_grpo": -0.5 / 6, "dapo": -0.5 / 5}[loss_type]
        assert loss.item() == pytest.approx(want, abs=1e-7)
    # old_logp None means on-policy; the gradient is REINFORCE with the baseline: -A * mask / normaliser.
    loss, _ = policy_loss(logp, None, ADV, MASK, loss_type="dapo")
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -ADV[:, None] * MASK / 5)


def test_kl_k3():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    _, m = policy_loss(logp, None, ADV, MASK, ref_logp=logp.detach().clone(), beta=0.1)
    assert m["kl"] == 0.0
    ref = logp.detach() + torch.tensor([[0.3, -0.2, 5.0], [0.0, 1.0, -1.0]])
    k = kl_k3(logp.detach(), ref)
    assert (k >= 0).all()
    assert k[0, 0].item() == pytest.approx(math.exp(0.3) - 0.3 - 1, abs=1e-6)
    loss0, _ = policy_loss(logp, None, ADV, MASK, loss_type="dapo", ref_logp=ref, beta=0.0)
    loss1, m = policy_loss(logp, None, ADV, MASK, loss_type="dapo", ref_logp=ref, beta=0.1)
    kl_sum = sum(math.exp(d) - d - 1 for d in (0.3, -0.2, 0.0, 1.0, -1.0))  # the masked 5.0 is left out
    assert m["kl"] == pytest.approx(kl_sum / 5, abs=1e-6)
    assert loss1.item() - loss0.item() == pytest.approx(0.1 * kl_sum / 5, abs=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_micro_batch_split_invariance(loss_type, importance):
    gen = torch.Generator().manual_seed(3)
    B, L = 6, 5
    mask = torch.ones(B, L)
    for i, n in enumerate([5, 2, 4, 1, 3, 5]):
        mask[i, n:] = 0
    old = -torch.rand(B, L, generator=gen) * 3
    logp = (old + 0.4 * torch.randn(B, L, generator=gen)).requires_grad_(True)
    ref = old + 0.1 * torch.randn(B, L, generator=gen)
    adv = torch.randn(B, generator=gen)
    kw = dict(loss_type=loss_type, beta=0.05, importance=importance, max_completion_length=8, epsilon_high=0.28)
    full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, num_items_in_batch=mask.sum().item(),
                          num_sequences_in_batch=B, **kw)
    g_full = torch.autograd.grad(full, logp)[0]
    glob = dict(num_items_in_batch=mask.sum().item(), num_sequences_in_batch=B)
    parts = [slice(0, 2), slice(2, 6)]  # uneven split
    split = sum(policy_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], **glob, **kw)[0] for s in parts)
    g_split = torch.autograd.grad(split, logp)[0]
    assert split.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(g_split, g_full, atol=1e-6, rtol=1e-6)
    # The defaults (the micro-batch's own counts) equal the global ones on the whole batch.
    default, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    assert default.item() == pytest.approx(full.item(), abs=1e-6)


def test_clipped_tokens_get_no_gradient():
    logp, old = example()
    loss, _ = policy_loss(logp, old, ADV, MASK, loss_type="bnpo")
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0] == 0.0  # rho 1.5 > 1.2 with A > 0
    assert g[1, 2] == 0.0  # rho 0.7 < 0.8 with A < 0
    assert g[0, 2] == 0.0  # masked
    assert g[1, 0] != 0.0  # rho 1.3 with A < 0: the unclipped term is the minimum, gradient flows
    # d/dlogp of -rho A / 5 = -rho A / 5
    assert g[0, 1].item() == pytest.approx(-0.7 * 1.0 / 5, abs=1e-6)


def test_gspo_sequence_ratio():
    # s_0 = exp(mean(log 1.5, log 0.7)) = sqrt(1.05); s_1 = (1.3 * 1.0 * 0.7) ** (1/3) = 0.91 ** (1/3).
    s0, s1 = math.sqrt(1.05), 0.91 ** (1 / 3)
    logp, old = example()
    loss, m = policy_loss(logp, old, ADV, MASK, loss_type="grpo", importance="sequence", epsilon_low=3e-4,
                          epsilon_high=4e-4)
    assert m["seq_ratio"] == pytest.approx((s0 + s1) / 2, abs=1e-6)
    # Both sequences clip: s_0 > 1 + 4e-4 with A > 0, s_1 < 1 - 3e-4 with A < 0.
    assert loss.item() == pytest.approx((-(1 + 4e-4) * 1.0 + (1 - 3e-4) * 0.5) / 2, abs=1e-6)
    assert m["clip_ratio"] == 1.0
    assert not torch.autograd.grad(loss, logp)[0].any()
    # Unclipped: loss = mean_i(-s_i A_i); d/dlogp_{i,t} = -A_i s_i / |o_i| / B.
    logp, old = example()
    loss, _ = policy_loss(logp, old, ADV, MASK, loss_type="grpo", importance="sequence", epsilon_low=0.5,
                          epsilon_high=0.5)
    assert loss.item() == pytest.approx((-s0 * 1.0 + s1 * 0.5) / 2, abs=1e-6)
    (g,) = torch.autograd.grad(loss, logp)
    want = torch.tensor([[-s0 / 2 / 2, -s0 / 2 / 2, 0.0], [0.5 * s1 / 3 / 2] * 3])
    torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-6)


def test_truncated_importance_sampling_weights_each_token():
    """Tokens sampled by another model (a quantized copy): each policy term is weighted by
    min(pi_old / pi_sampler, cap), its gradient too; the KL term is not; a sampler equal to the policy changes nothing."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    plain, _ = policy_loss(logp, None, ADV, MASK, loss_type="dapo")
    same, m = policy_loss(logp, None, ADV, MASK, loss_type="dapo", rollout_logp=logp.detach().clone())
    assert same.item() == plain.item() and m["rollout_is/weight"] == 1.0 and m["rollout_is/abs_log_ratio"] == 0.0
    # Row 0: the sampler gave its tokens 4x less probability than the policy (weight 4, capped at 2); row 1: 2x more.
    sampler = logp.detach() + torch.tensor([[-math.log(4.0)] * 3, [math.log(2.0)] * 3])
    loss, m = policy_loss(logp, None, ADV, MASK, loss_type="dapo", rollout_logp=sampler, rollout_is_cap=2.0)
    (g,) = torch.autograd.grad(loss, logp)
    (g_plain,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(g, g_plain * torch.tensor([[2.0], [0.5]]))
    active = MASK.sum().item()
    assert m["rollout_is/capped"] == pytest.approx(MASK[0].sum().item() / active)
    assert m["rollout_is/weight"] == pytest.approx((2.0 * MASK[0].sum() + 0.5 * MASK[1].sum()).item() / active)
    assert m["rollout_is/abs_log_ratio"] == pytest.approx(
        (math.log(4.0) * MASK[0].sum() + math.log(2.0) * MASK[1].sum()).item() / active, rel=1e-6)
    # beta > 0: the KL gradient is added unweighted.
    ref = logp.detach() + 0.3
    with_kl, _ = policy_loss(logp, None, ADV, MASK, loss_type="dapo", rollout_logp=sampler, ref_logp=ref, beta=0.1)
    kl_only, _ = policy_loss(logp, None, torch.zeros_like(ADV), MASK, loss_type="dapo", ref_logp=ref, beta=0.1)
    (g_kl,) = torch.autograd.grad(with_kl, logp)
    (g_kl_only,) = torch.autograd.grad(kl_only, logp)
    torch.testing.assert_close(g_kl, g + g_kl_only)
