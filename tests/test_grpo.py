"""GRPO end to end on a tiny model: rollouts from the engine, rewards, the shared loop — and the model learns."""

import json

import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from sputnik import kernels
from sputnik.checkpoint import quantized_copy
from sputnik.config import ModelConfig
from sputnik.model import Transformer
from sputnik.tokenizer import Tokenizer
from sputnik.train.grpo import GRPOConfig, GRPOObjective, check_rollout_copy
from sputnik.train.logprobs import token_logprobs
from sputnik.train.loop import TrainConfig, Trainer
from torchrun import write_shared

CHARS = list("0123456789abcdefghij ?")


def char_tokenizer() -> Tokenizer:
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<eos>", pad_token="<eos>")


def setup(tmp_path, **overrides):
    data = tmp_path / "threes.jsonl"
    write_shared(data, "".join(json.dumps({"prompt": f"{a}{b}?", "answer": "3"}) + "\n"
                               for a in "abcdefghij" for b in "abcdefghij"))
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(family="llama", vocab_size=len(CHARS) + 2, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, inter_dim=64, max_seq_len=64))
    settings = dict(task=f"jsonl:{data},verifier=number", template="plain", prompts_per_step=4, num_generations=8,
                    max_completion_length=3, temperature=1.0, micro_batch_size=16, train_pool=64, eval_n=0)
    cfg = GRPOConfig(**{**settings, **overrides})
    return model, tok, cfg


@pytest.mark.parametrize("rollout_quantize", [
    "none", pytest.param("int8", marks=pytest.mark.skipif(not kernels.available(), reason="needs the CPU kernels"))])
def test_tiny_model_learns_to_answer_three(tmp_path, rollout_quantize):
    model, tok, cfg = setup(tmp_path, rollout_quantize=rollout_quantize)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    train = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=40, lr=3e-3, progress=False, plot_every=0)
    Trainer(model, train, objective).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert all(k in rows[-1] for k in ("loss", "accuracy", "completion_length", "clip_ratio", "entropy"))
    assert ("rollout_is/weight" in rows[-1]) == (rollout_quantize != "none")
    assert (tmp_path / "run" / "metrics.png").is_file()


def test_prepare_builds_masks_advantages_and_global_counts(tmp_path):
    model, tok, cfg = setup(tmp_path, num_iterations=2, beta=0.04, micro_batch_size=5)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    micro = objective.prepare(0, model)
    assert sum(m.tokens.shape[0] for m in micro) == 32 and [m.tokens.shape[0] for m in micro][0] == 5
    mask = torch.cat([m.mask for m in micro])
    assert micro[0].num_items == mask.sum().item() and micro[0].num_seqs == 32
    adv = torch.cat([m.adv for m in micro]).view(4, 8)
    assert torch.allclose(adv.sum(1), torch.zeros(4), atol=1e-5)  # group-relative
    # mu = 2 keeps the old log-probs; beta > 0 scores a reference that starts equal to the policy: KL 0 at first.
    loss, metrics = objective.loss(model, micro[0])
    assert torch.isfinite(loss) and metrics["kl"] == 0.0 and metrics["clip_ratio"] == 0.0
    for m in micro:
        lengths = m.attn.sum(1) - (m.attn[:, : m.P].sum(1))
        assert torch.all(m.mask.sum(1) <= lengths)  # no loss on padding


def test_dynamic_sampling_drops_groups_with_equal_rewards(tmp_path):
    model, tok, cfg = setup(tmp_path, dynamic_sampling=True, max_refills=3)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    micro = objective.prepare(0, model)
    adv = torch.cat([m.adv for m in micro]).view(-1, 8)
    assert (adv.abs().sum(1) > 0).all()  # every kept group carries a signal


def test_truncated_completions_can_be_left_out_of_the_loss(tmp_path):
    """DAPO's overlong filtering (mask_truncated_completions): rows that hit the length limit get no loss; their
    rewards still count in their group."""
    from sputnik.engine import Completion

    def prepared(mask_truncated: bool):
        model, tok, cfg = setup(tmp_path, beta=0.04, mask_truncated_completions=mask_truncated)

        class Cut(GRPOObjective):  # even samples stop after "3", odd ones run to the limit on "333"
            def _sample(self, model, idx, step, attempt):
                return [[Completion("333", tok.encode("333"), [], "length", 0) if j % 2 else
                         Completion("3", tok.encode("3") + [0], [], "stop", 0) for j in range(8)] for _ in idx]

        objective = Cut(model, tok, cfg, seed=0)
        return objective.prepare(0, model), objective.metrics(0)

    kept, metrics = prepared(False)
    assert sum(m.tokens.shape[0] for m in kept) == 32 and kept[0].num_items == 16 * 2 + 16 * 3
    masked, masked_metrics = prepared(True)
    assert sum(m.tokens.shape[0] for m in masked) == 16 and masked[0].num_items == 16 * 2
    assert torch.all(torch.cat([m.adv for m in masked]) > 0)  # the right answers, against groups half wrong
    assert masked_metrics["reward"] == metrics["reward"] == 0.5


def test_kill_and_resume_gives_the_same_next_step(tmp_path):
    def run(out, steps, resume=False):
        model, tok, cfg = setup(tmp_path, num_iterations=2)
        trainer = Trainer(model, TrainConfig(out_dir=str(out), max_steps=steps, lr=3e-3, progress=False,
                                             plot_every=0, save_every=2), GRPOObjective(model, tok, cfg, seed=0))
        if resume:
            assert trainer.resume() == 2
        trainer.run()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, trainer.model

    straight, m1 = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)  # "killed" after the checkpoint at step 2
    resumed, m2 = run(tmp_path / "b", 3, resume=True)
    assert resumed[-1]["step"] == 3
    for key in ("loss", "reward", "grad_norm", "completion_length"):
        assert resumed[-1][key] == straight[-1][key], key
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_rows_with_zero_advantage_can_be_left_out_exactly():
    """prepare() skips rows whose advantage is 0 (beta = 0): same loss and gradient for every loss type."""
    from sputnik.train.grpo_math import policy_loss

    torch.manual_seed(0)
    logp = torch.randn(6, 5, requires_grad=True)
    old = (logp + 0.3 * torch.randn(6, 5)).detach()
    adv = torch.tensor([0.0, 1.2, -0.7, 0.0, 0.5, 0.0])
    mask = (torch.rand(6, 5) > 0.2).float()
    keep = adv != 0
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for importance in ("token", "sequence"):
            kw = dict(loss_type=loss_type, importance=importance, max_completion_length=5,
                      num_items_in_batch=mask.sum().item(), num_sequences_in_batch=6)
            full, _ = policy_loss(logp, old, adv, mask, **kw)
            (g_full,) = torch.autograd.grad(full, logp)
            part, _ = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], **kw)
            (g_part,) = torch.autograd.grad(part, logp)
            assert torch.allclose(full, part, atol=1e-7), (loss_type, importance)
            assert torch.allclose(g_full, g_part, atol=1e-7), (loss_type, importance)


def test_ranks_take_disjoint_prompts(tmp_path, monkeypatch):
    model, tok, cfg = setup(tmp_path)
    taken = []
    for rank in range(3):
        objective = GRPOObjective(model, tok, cfg, seed=0)
        monkeypatch.setattr("sputnik.train.loop.dist_info", lambda rank=rank: (rank, 3))
        taken.append([objective._next_prompts(4) for _ in range(3)])
    for step in range(3):
        slots = [i for rank in range(3) for i in taken[rank][step]]
        assert len(set(slots)) == 12  # no prompt twice in one global batch


def test_resumed_run_keeps_its_logged_baseline(tmp_path):
    from sputnik.train.grpo import _logged_eval

    path = tmp_path / "metrics.jsonl"
    assert _logged_eval(path, 0) == {}
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval/accuracy": 0.1, "eval/format_rate": 0.0},
        {"step": 1, "loss": 0.5},
        {"step": 20, "loss": 0.1, "eval/accuracy": 0.7},
    ]) + "\n")
    assert _logged_eval(path, 0) == {"accuracy": 0.1, "format_rate": 0.0}
    assert _logged_eval(path, 20) == {"accuracy": 0.7}
    assert _logged_eval(path, 1) == {}


DIST_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_grpo import replayed
from sputnik.train.loop import Trainer, TrainConfig, finish_distributed, init_distributed

rank, world = init_distributed()
model, objective = replayed({data!r}, prompts_per_step=4)
Trainer(model, TrainConfig(out_dir={out!r}, max_steps=2, lr=3e-3, progress=False, plot_every=0, fsdp={fsdp}),
        objective).run()
finish_distributed()
"""


def replayed(tmp: str, **overrides):
    """A GRPO objective whose rollouts are fixed per problem (so 1 and 2 processes see the same samples)."""
    from pathlib import Path

    from sputnik.engine import Completion

    model, tok, cfg = setup(Path(tmp), **overrides)

    class Replayed(GRPOObjective):
        def _sample(self, model, idx, step, attempt):
            return [[Completion(text, tok.encode(text) + [0], [], "stop", 0)
                     for text in (f"{(i + j + step) % 5}" * (1 + j % 3) for j in range(self.cfg.num_generations))]
                    for i in idx]

    return model, Replayed(model, tok, cfg, seed=0)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, fsdp):
    """Under FSDP the log-probs run inside the model's call (the root's norm and head are gathered there) and a rank
    with fewer trained rows runs padding micro-batches, so the ranks' collectives match."""
    import textwrap
    from pathlib import Path

    from torchrun import assert_two_equal_one, torchrun

    tests = Path(__file__).resolve().parent
    script = tmp_path / "grpo_dist.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT.format(tests=str(tests), data=str(tmp_path),
                                                         out=str(tmp_path / "two"), fsdp=fsdp)))
    torchrun(script)
    model, objective = replayed(str(tmp_path), prompts_per_step=8)  # both ranks' prompts in one process
    Trainer(model, TrainConfig(out_dir=str(tmp_path / "one"), max_steps=2, lr=3e-3, progress=False, plot_every=0),
            objective).run()
    rows, one = assert_two_equal_one(tmp_path / "two", tmp_path / "one", model)
    assert [a["reward"] for a in rows] == [b["reward"] for b in one]
    assert any(a["grad_norm"] > 0 for a in rows)


ROLLOUT_SCRIPT = """
import copy, json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_grpo import replayed
from sputnik.engine import Engine, SamplingParams
from sputnik.train.loop import Trainer, TrainConfig, finish_distributed, init_distributed
rank, world = init_distributed()
model, objective = replayed({data!r}, prompts_per_step=4)
reference = copy.deepcopy(model)
trainer = Trainer(model, TrainConfig(out_dir={out!r}, max_steps=2, lr=3e-2, progress=False, plot_every=0, fsdp=True),
                  objective)
prompts = [objective.tok.encode(p) for p in ["ab?", "cd?", "ef?"]]
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
seen = []
for step in range(3):
    full = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.model.state_dict().items()}}
    reference.load_state_dict(full)
    got = [c[0].token_ids for c in Engine(trainer.model, objective.tok, max_batch=8).generate(prompts, greedy)]
    want = [c[0].token_ids for c in Engine(reference, objective.tok, max_batch=8).generate(prompts, greedy)]
    seen.append({{"got": got, "want": want}})
    trainer.model.train()
    trainer.train_step(step)
os.makedirs({out!r}, exist_ok=True)
json.dump(seen, open(os.path.join({out!r}, f"tokens_{{rank}}.json"), "w"))
finish_distributed()
"""


def test_engine_samples_from_an_fsdp_sharded_model(tmp_path):
    """GRPO's rollouts under FSDP2: the engine on the sharded model gives the full model's greedy tokens, step after
    step (no fused weights re-pointed into FSDP's buffers, no inference tensors left for training to reuse)."""
    import textwrap
    from pathlib import Path

    from torchrun import torchrun

    script = tmp_path / "rollout.py"
    script.write_text(textwrap.dedent(ROLLOUT_SCRIPT.format(tests=str(Path(__file__).resolve().parent),
                                                            data=str(tmp_path), out=str(tmp_path / "out"))))
    torchrun(script)
    for rank in (0, 1):
        steps = json.loads((tmp_path / "out" / f"tokens_{rank}.json").read_text())
        assert len(steps) == 3 and all(len(s["got"]) == 3 and len(s["got"][0]) == 6 for s in steps)
        for step, s in enumerate(steps):
            assert s["got"] == s["want"], (rank, step)


def test_a_task_without_training_problems_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    model, tok, cfg = setup(tmp_path, task=f"jsonl:{empty},verifier=number")
    with pytest.raises(ValueError, match="empty.jsonl.*no training problems"):
        GRPOObjective(model, tok, cfg, seed=0)


@pytest.mark.skipif(not kernels.available(), reason="needs sputnik's CPU kernels (a C++ compiler)")
def test_rollouts_from_a_quantized_copy_carry_its_logprobs(tmp_path):
    """rollout_quantize: the rollouts come from an int4 copy of the policy, and each row keeps the copy's log-probs of
    its tokens, which the loss weighs against the policy's (truncated importance sampling)."""
    model, tok, cfg = setup(tmp_path, rollout_quantize="int4", micro_batch_size=64)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    (micro,) = objective.prepare(0, model)
    copy = quantized_copy(model, "int4")
    mine = torch.zeros_like(micro.sampled)
    with torch.no_grad():
        for b in range(len(mine)):  # row by row, unpadded: the copy's own forward over prompt + completion
            ids = micro.tokens[b][micro.attn[b]]
            logp = copy(ids[None])[0].float().log_softmax(-1)
            prompt = int(micro.attn[b, : micro.P].sum())
            picked = logp[prompt - 1 : -1].gather(1, ids[prompt:, None])[:, 0]
            mine[b, : len(picked)] = picked
        policy = token_logprobs(model, micro.tokens, micro.attn, temperature=1.0, start=micro.P - 1)[:, micro.P - 1:]
    on = micro.mask > 0
    assert on.any() and micro.sampled.shape == micro.mask.shape
    # The copy sampled them: its forward gives their log-probs up to its float16 KV cache's rounding (the cache the
    # server keeps under blocks), a twentieth of how far the policy is from the copy.
    to_copy, to_policy = (micro.sampled - mine)[on].abs(), (micro.sampled - policy)[on].abs()
    assert to_copy.max() < 0.02 and to_copy.mean() < 0.2 * to_policy.mean(), (to_copy.mean(), to_policy.mean())
    _, metrics = objective.loss(model, micro)
    assert metrics["rollout_is/abs_log_ratio"] == pytest.approx((policy - micro.sampled)[on].abs().mean().item(),
                                                                rel=1e-3)
    assert 0 < metrics["rollout_is/weight"] < 2


@pytest.mark.skipif(not kernels.available(), reason="needs sputnik's CPU kernels (a C++ compiler)")
def test_rollout_copy_weights_use_the_old_logprobs_after_an_update(tmp_path):
    """With several updates per batch (mu > 1) the policy at rollout time is the one the step scored as `old`: the
    weights stay old / copy after the policy has moved."""
    model, tok, cfg = setup(tmp_path, rollout_quantize="int8", num_iterations=2, micro_batch_size=64)
    (micro,) = GRPOObjective(model, tok, cfg, seed=0).prepare(0, model)
    with torch.no_grad():  # an update's worth of change
        model.lm_head.weight.mul_(1.5)
    on = micro.mask > 0
    _, metrics = GRPOObjective(model, tok, cfg, seed=0).loss(model, micro)
    assert metrics["ratio"] != pytest.approx(1.0, abs=1e-3)  # the policy moved
    assert metrics["rollout_is/abs_log_ratio"] == pytest.approx((micro.old - micro.sampled)[on].abs().mean().item(),
                                                                rel=1e-4)


def test_rollout_copy_refuses_fsdp_and_a_cap_below_one(tmp_path):
    model, tok, cfg = setup(tmp_path, rollout_quantize="int8")
    with pytest.raises(ValueError, match="FSDP"):
        check_rollout_copy(cfg, TrainConfig(out_dir=str(tmp_path / "run"), fsdp=True))
    with pytest.raises(ValueError, match="rollout_is_cap"):
        check_rollout_copy(GRPOConfig(rollout_quantize="int8", rollout_is_cap=0.5), TrainConfig())
    check_rollout_copy(GRPOConfig(rollout_is_cap=0.5), TrainConfig())  # no copy, no weights: nothing to check
