"""GRPO (the R1-Zero recipe) as an objective of the shared train loop: rollouts from the engine, verifiable rewards,
group-relative advantages, a clipped surrogate with TRL's loss types, GSPO, DAPO's dynamic sampling, a KL to a
periodically reset reference, and LoRA for low-memory runs."""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sputnik.checkpoint import quantized_copy
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.grammar import json_answer
from sputnik.engine.multiturn import RESUME_BLOCK, AgentConfig, MultiTurn, prefix_cache_mb, tool_rollouts
from sputnik.engine.native import auto_cache_dtype
from sputnik.eval.run import EvalConfig, evaluate, load_summary, prompt_ids, thinking
from sputnik.r1 import GRADINGS, THINK_MODES, answer_part
from sputnik.rewards import combine
from sputnik.seeds import mix
from sputnik.settings import option
from sputnik.tasks import TEMPLATES, Problem, get_task
from sputnik.tools.env import environment_maker
from sputnik.train.grpo_math import LOSS_TYPES, group_advantages, policy_loss, zero_std_fraction
from sputnik.train.logprobs import completion_mask, token_logprobs
from sputnik.train.loop import RankAware, TrainConfig, all_gather_object, all_reduce_sum, dist_info, gathered
from sputnik.train.lora import DEFAULT_TARGETS
from sputnik.train.plots import read_rows


@dataclass
class GRPOConfig:
    """GRPO settings; names follow TRL's GRPOConfig where one exists."""

    task: str = option("arithmetic", "arithmetic, countdown, math[:FILE], gym:NAME, jsonl:FILE, korean-arithmetic, "
                                     "korean-countdown "
                                     "(options after ':', e.g. arithmetic:digits=3)")
    template: str = option("chat", "how a problem becomes a prompt", choices=list(TEMPLATES))
    system: str | None = option(None, "system message of the chat template")
    suffix: str | None = option(None, "text after the problem (default: the task's format instruction)")
    think: str = option("auto", "the prompt's reasoning: auto (as the template renders it), open (rollouts start inside "
                                "<think>), closed (an empty thought: train to answer directly, the control run)",
                        choices=list(THINK_MODES))
    prompts_per_step: int = option(4, "prompts per step, per rank")
    num_generations: int = option(8, "completions per prompt (the group size G)")
    max_completion_length: int = option(128, "tokens per completion")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_p: float = option(1.0, "nucleus sampling of the rollouts")
    top_k: int = option(0, "top-k sampling of the rollouts (0: off)")
    loss_type: str = option("dapo", "how token losses are aggregated", choices=list(LOSS_TYPES))
    scale_rewards: str = option("group", "divide advantages by the reward std of the group, the batch, or not",
                                choices=["group", "batch", "none"])
    epsilon: float = option(0.2, "lower clip range of the importance ratio")
    epsilon_high: float | None = option(None, "upper clip range (DAPO's clip-higher: 0.28; default: epsilon)")
    importance_sampling_level: str = option("token", "token ratios, or one per sequence (GSPO)",
                                            choices=["token", "sequence"])
    beta: float = option(0.0, "KL weight; 0 loads no reference model")
    ref_model_sync_steps: int = option(0, "reset the reference to the policy every N steps (0: never)")
    num_iterations: int = option(1, "updates per batch of rollouts (mu)")
    rollout_quantize: str = option("none", "sample the rollouts from a copy of the policy in int8 / int4 blocks, made "
                                           "again after each update (faster on CPUs with sputnik's kernels); its "
                                           "tokens are reweighted by truncated importance sampling",
                                   choices=["none", "int8", "int4"])
    rollout_is_cap: float = option(2.0, "cap on the importance weight policy / copy of each token sampled by the copy")
    dynamic_sampling: bool = option(False, "DAPO: drop groups whose rewards are all equal and refill them")
    max_refills: int = option(4, "rounds of refilling per step under dynamic_sampling")
    mask_truncated_completions: bool = option(False, "no loss on completions cut off at max_completion_length")
    rewards: dict[str, float] = option({"accuracy": 1.0, "format": 0.0},
                                       "reward name -> weight, e.g. '{accuracy: 1, format: 0.5}'")
    reward_options: dict[str, Any] = option({}, "keyword options of the rewards, e.g. '{language: ko}'")
    grading: str = option("strict", "accuracy on the answer after </think> only, an unclosed thought 0 (strict, R1's "
                                    "rule), or the last answer anywhere (lenient, for models that do not think)",
                          choices=list(GRADINGS))
    micro_batch_size: int = option(8, "sequences per forward/backward")
    train_pool: int = option(2000, "training problems drawn from the task's train split, cycled")
    eval_every: int = option(0, "greedy accuracy on held-out problems every N steps (0: before and after only)")
    eval_n: int = option(200, "held-out problems per evaluation")
    lora_r: int = option(0, "LoRA rank (0: train every weight)")
    lora_alpha: float = option(32.0, "LoRA alpha")
    lora_target_modules: list[str] = option(list(DEFAULT_TARGETS), "modules LoRA adapts")
    tools: list[str] = option([], "tools the rollouts may call: calculator, python, or module:function (multi-turn "
                                  "rollouts; max_completion_length then bounds each turn and the whole rollout)")
    environment_factory: str | None = option(None, "module:function returning an object whose public methods are "
                                                   "the tools, one per rollout (reset(problem) first, if it has one)")
    max_turns: int = option(4, "model turns per rollout with tools")
    tool_timeout: float = option(10.0, "seconds a turn's tool calls may take")
    tool_call_reward: float = option(0.0, "shaping: added once to a rollout whose calls all succeeded")
    tool_error_penalty: float = option(0.0, "shaping: subtracted per failed tool call")
    malformed_call_penalty: float = option(0.0, "shaping: subtracted per turn with a call that does not parse")


@dataclass
class Rollout:
    """One sampled completion of a prompt, with its reward."""

    prompt: list[int]
    completion: list[int]
    reward: float  # a skipped row holds the mean of its group's other rewards, leaving the group's mean as it is
    parts: dict[str, float | None]  # each reward function's value
    truncated: bool  # the completion hit max_completion_length
    think_tokens: int = 0  # tokens of reasoning (0: the completion did not think)
    closed: bool = False  # the completion closed a thought (wrote </think>): an answer can follow
    skip: bool = False  # an unverifiable gold answer: no gradient, no effect on the group
    own: list[int] | None = None  # with tools: 1 where the model sampled the token, 0 for tool results and glue
    logprobs: list[float] | None = None  # the sampler's log-probs of the completion's tokens (0.0 on tool tokens)
    turn: MultiTurn | None = None  # with tools: the whole rollout (calls, errors, tool tokens)


@dataclass
class MicroBatch:
    """Rows of one step's rollouts as tensors, with the step's global counts the loss normalises by."""

    tokens: Tensor  # [B, P + L]: prompts left-padded to P, completions right-padded after them
    attn: Tensor  # [B, P + L] bool: the real tokens
    mask: Tensor  # [B, L]: the completion tokens the loss counts
    adv: Tensor  # [B]
    P: int  # the padded prompt length: completion token t sits at column P + t
    old: Tensor | None  # [B, L] log-probs of the policy that sampled (num_iterations > 1)
    ref: Tensor | None  # [B, L] log-probs of the reference (beta > 0)
    sampled: Tensor | None  # [B, L] log-probs of the sampler when it was a quantized copy of the policy
    num_items: float  # active completion tokens in the whole step, over every rank
    num_seqs: int  # rows in the whole step, over every rank


@dataclass
class GRPOSummary:
    """What a GRPO run did (out_dir/summary.json): greedy eval figures before and after, and its length."""

    model: str
    task: str
    before: dict[str, float]
    after: dict[str, float]
    minutes: float
    steps: int
    resumed_from: int
    eval_problems: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class GRPOObjective(RankAware):
    """Prepares one step's rollouts as micro-batches and scores them with the GRPO loss."""

    def __init__(self, model, tokenizer, cfg: GRPOConfig, seed: int = 0):
        self.cfg, self.tok, self.seed = cfg, tokenizer, seed
        self.task = get_task(cfg.task)
        self.iterations = cfg.num_iterations
        self.reward = combine(cfg.rewards, **{"grading": cfg.grading, **cfg.reward_options})
        pool = self._pool()
        if not pool:
            raise ValueError(f"{cfg.task}: the task has no training problems")
        self.problems = pool
        self.env_maker = environment_maker(cfg.tools, cfg.environment_factory)
        self.prompts = [self._prompt(p) for p in pool]
        self.order = list(range(len(pool)))
        self.rng = random.Random(seed)
        self.rng.shuffle(self.order)
        self.cursor = 0
        self.ref = None
        if cfg.beta > 0:
            self.ref = copy.deepcopy(model).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        self._step_metrics: dict[str, float] = {}

    def _prompt(self, problem: Problem) -> tuple[list[int], bool]:
        """The problem's prompt ids (with the tools offered, for multi-turn rollouts) and whether it opens <think>."""
        env = self.env_maker(problem) if self.env_maker is not None else None
        return prompt_ids(self.task, problem, self.tok, self._eval_cfg(), env)

    def _pool(self) -> list[Problem]:
        n = self.cfg.train_pool
        while True:
            try:
                return self.task.problems("train", n, seed=self.seed)
            except ValueError:
                if n <= 16:
                    raise
                n //= 2  # small problem spaces (2-digit addition) hold fewer distinct problems

    def _eval_cfg(self, n: int = 0) -> EvalConfig:
        c = self.cfg
        return EvalConfig(task=c.task, n=n, k=0, template=c.template, system=c.system, suffix=c.suffix,
                          max_tokens=c.max_completion_length, seed=self.seed, grading=c.grading, think=c.think,
                          tools=list(c.tools), environment_factory=c.environment_factory, max_turns=c.max_turns,
                          tool_timeout=c.tool_timeout)

    # ------------------------------------------------------------------ state for exact resume
    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "order": self.order, "rng": self.rng.getstate(),
                "ref": None if self.ref is None else self.ref.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.order = state["cursor"], state["order"]
        self.rng.setstate(state["rng"])
        if self.ref is not None and state.get("ref") is not None:
            self.ref.load_state_dict(state["ref"])

    def metrics(self, step: int) -> dict[str, float]:
        return dict(self._step_metrics)

    # ------------------------------------------------------------------ rollouts
    def _next_prompts(self, n: int) -> list[int]:
        """Indices of the next n problems for this rank: every rank walks the same shuffled order (same seed) and
        takes its own n-slot share of each stride of n x world."""
        stride = n * self.world
        if self.cursor + stride > len(self.order):
            self.rng.shuffle(self.order)
            self.cursor = 0
        start = self.cursor + self.rank * n
        self.cursor += stride
        return [self.order[(start + i) % len(self.order)] for i in range(n)]

    def _sample(self, model, idx: list[int], step: int, attempt: int) -> list[list]:
        """G completions for each problem index, from the engine (its KV cache as the server keeps it for this model:
        the policy's dtype, float16 under a quantized copy)."""
        c, G = self.cfg, self.cfg.num_generations
        engine = Engine(model, self.tok, max_batch=len(idx) * G, kv_dtype=auto_cache_dtype(model))
        seed = mix(self.seed, step * 1009, attempt * 31, self.rank, bits=31)
        params = SamplingParams(max_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                                top_k=c.top_k, n=G, seed=seed)
        if self.task.output_schema is not None:  # a task that answers in JSON samples under its schema
            params.constraint = json_answer(self.task.output_schema, self.tok, self.prompts[idx[0]][1])
        return engine.generate([self.prompts[i][0] for i in idx], params)

    def _rollout(self, model, step: int, attempt: int) -> list[list[Rollout]]:
        """One group of G scored rollouts for each of this rank's next prompts."""
        idx = self._next_prompts(self.cfg.prompts_per_step)
        if self.env_maker is not None:
            return self._tool_rollout(model, idx, step, attempt)
        outs = self._sample(model, idx, step, attempt)
        groups = []
        for i, comps in zip(idx, outs):
            problem, (ids, think_opened) = self.problems[i], self.prompts[i]
            # Language consistency is judged in the prompt's own language unless the options name one.
            language = self.cfg.reward_options.get("language") or self.task.language_of(problem)
            scored = [self.reward(problem, comp.text, self.task, length=len(comp.token_ids), think_opened=think_opened,
                                  language=language) for comp in comps]
            valid = [total for total, _ in scored if total is not None]
            fill = sum(valid) / len(valid) if valid else 0.0
            groups.append([Rollout(ids, comp.token_ids, fill if total is None else total, parts,
                                   truncated=comp.finish_reason == "length", skip=total is None,
                                   think_tokens=self._think_tokens(comp.text, think_opened),
                                   closed=answer_part(comp.text) is not None, logprobs=comp.logprobs)
                           for comp, (total, parts) in zip(comps, scored)])
        return groups

    def _think_tokens(self, text: str, think_opened: bool) -> int:
        reasoning = thinking(text, think_opened)
        return len(self.tok.encode(reasoning, add_special_tokens=False)) if reasoning else 0

    def _tool_rollout(self, model, idx: list[int], step: int, attempt: int) -> list[list[Rollout]]:
        """Multi-turn rollouts with the configured tools; the reward reads the last turn, plus the tool shaping."""
        c, G = self.cfg, self.cfg.num_generations
        n, longest = len(idx) * G, max(len(self.prompts[i][0]) for i in idx) + c.max_completion_length
        engine = Engine(model, self.tok, max_batch=n, prefix_cache_mb=prefix_cache_mb(model, n, longest),
                        prefill_block=RESUME_BLOCK, kv_dtype=auto_cache_dtype(model))
        # Streams by global row (the rank's rows follow those of the ranks before it): N processes sample what one
        # process sampling every rank's prompts would.
        seed = mix(self.seed, step * 1009, attempt * 31, bits=31)
        first = self.rank * n
        params = SamplingParams(max_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                                top_k=c.top_k, seed=seed)
        envs = [self.env_maker(self.problems[i]) for i in idx for _ in range(G)]
        agent = AgentConfig(max_turns=c.max_turns, max_total_tokens=c.max_completion_length,
                            tool_timeout_s=c.tool_timeout)
        turns = tool_rollouts(engine, [self.prompts[i][0] for i in idx for _ in range(G)], params, envs, agent,
                              chat=c.template == "chat", system=c.system, seed_indices=list(range(first, first + n)))
        groups = []
        for g, i in enumerate(idx):
            problem, (ids, think_opened) = self.problems[i], self.prompts[i]
            rows = turns[g * G : (g + 1) * G]
            scored = [self.reward(problem, t.final_text, self.task, length=len(t.tokens),
                                  think_opened=think_opened and not t.thought_closed_before()) for t in rows]
            shaped = [None if total is None else total + self._shaping(t) for t, (total, _) in zip(rows, scored)]
            valid = [x for x in shaped if x is not None]
            fill = sum(valid) / len(valid) if valid else 0.0
            groups.append([Rollout(ids, t.tokens, fill if x is None else x, parts, truncated=t.finish_reason == "length",
                                   skip=x is None, own=t.own, turn=t, logprobs=t.logprobs)
                           for t, x, (_, parts) in zip(rows, shaped, scored)])
        return groups

    def _shaping(self, t: MultiTurn) -> float:
        c = self.cfg
        bonus = c.tool_call_reward if t.calls and not t.tool_errors else 0.0
        return bonus - c.tool_error_penalty * t.tool_errors - c.malformed_call_penalty * t.malformed

    def _groups(self, model, step: int) -> tuple[list[list[Rollout]], list[Rollout], int]:
        """The step's groups (with dynamic sampling: those whose rewards differ, refilled up to max_refills times),
        every row sampled on the way, and the number of refills."""
        c = self.cfg
        groups = self._rollout(model, step, 0)
        seen = [r for g in groups for r in g]
        refills = 0
        if c.dynamic_sampling:
            kept = [g for g in groups if len({r.reward for r in g}) > 1]
            while len(kept) < c.prompts_per_step and refills < c.max_refills:
                refills += 1
                more = self._rollout(model, step, refills)
                seen += [r for g in more for r in g]
                kept += [g for g in more if len({r.reward for r in g}) > 1]
            groups = kept[: c.prompts_per_step] or groups  # nothing informative at all: train on zeros
        return groups, seen, refills

    def _advantages(self, rows: list[Rollout]) -> tuple[Tensor, Tensor]:
        """Every rank's rewards, and the advantages of this rank's rows. Advantages need every rank's rewards (batch
        scaling; metrics); groups never straddle ranks."""
        gathered = all_gather_object([r.reward for r in rows])
        everything = torch.tensor([x for part in gathered for x in part], dtype=torch.float32)
        adv_all = group_advantages(everything, self.cfg.num_generations, self.cfg.scale_rewards)
        offset = sum(len(part) for part in gathered[: self.rank])
        return everything, adv_all[offset : offset + len(rows)]

    def _pad(self, rows: list[Rollout]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """(tokens, attn, mask, truncated, P): prompts left-padded to a common length P, completions right-padded
        after them; mask holds the generated tokens up to the stop, less the rows the loss leaves out."""
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        P = max(len(r.prompt) for r in rows)
        L = max(max(len(r.completion) for r in rows), 1)
        tokens = torch.full((len(rows), P + L), pad, dtype=torch.long)
        attn = torch.zeros(len(rows), P + L, dtype=torch.bool)
        comp = torch.full((len(rows), L), pad, dtype=torch.long)
        for b, r in enumerate(rows):
            p, o = r.prompt, r.completion
            tokens[b, P - len(p) : P] = torch.tensor(p)
            tokens[b, P : P + len(o)] = torch.tensor(o, dtype=torch.long)
            attn[b, P - len(p) : P + len(o)] = True
            comp[b, : len(o)] = torch.tensor(o, dtype=torch.long)
        mask, truncated = completion_mask(comp, self.tok.stop_ids, pad)
        lengths = torch.tensor([len(r.completion) for r in rows])
        mask = mask * (torch.arange(L)[None] < lengths[:, None])  # only the generated tokens
        for b, r in enumerate(rows):
            if r.own is not None:  # the model's own tokens only: tool results and template glue (whose end-of-turn
                mask[b] = 0        # tokens completion_mask would take for the end) are not the policy's
                mask[b, : len(r.own)] = torch.tensor(r.own, dtype=mask.dtype)
                truncated[b] = r.truncated
        skip = torch.tensor([r.skip for r in rows])
        if self.cfg.mask_truncated_completions:
            skip |= torch.tensor([r.truncated for r in rows])
        mask[skip] = 0
        return tokens, attn, mask, truncated, P

    @torch.no_grad()
    def prepare(self, step: int, model) -> list[MicroBatch]:
        c = self.cfg
        if self.ref is not None and c.ref_model_sync_steps and step > 0 and step % c.ref_model_sync_steps == 0:
            self.ref.load_state_dict(model.state_dict())
        with gathered(model):  # under FSDP: the rollouts' forwards, as many as each rank's take, need no collective
            sampler = model if c.rollout_quantize == "none" else quantized_copy(model, c.rollout_quantize)
            groups, seen, refills = self._groups(sampler, step)
            del sampler
        rows = [r for g in groups for r in g]
        everything, adv = self._advantages(rows)
        tokens, attn, mask, truncated, P = self._pad(rows)

        num_items = all_reduce_sum(mask.sum()).item()
        num_seqs = int(all_reduce_sum(torch.tensor(float(len(rows)))).item())
        # A row with advantage 0 adds exactly 0 to the loss and its gradient when there is no KL term (whatever the
        # ratio), so it is left out of the forward/backward and of the old/reference scoring; the normalisers above
        # still count it, as TRL does.
        train = (adv != 0) & (mask.sum(1) > 0) if c.beta == 0 else mask.sum(1) > 0
        rows_idx = train.nonzero()[:, 0] if bool(train.any()) else torch.arange(1)
        tokens, attn, mask, adv = tokens[rows_idx], attn[rows_idx], mask[rows_idx], adv[rows_idx]
        sampled = None
        if c.rollout_quantize != "none":
            sampled = _padded([rows[i].logprobs or [] for i in rows_idx.tolist()], mask.shape[1])

        def score(m) -> Tensor:
            return token_logprobs(m, tokens, attn, temperature=c.temperature, start=P - 1)[:, P - 1 :]

        old = score(model) if c.num_iterations > 1 else None
        ref = score(self.ref) if self.ref is not None else None
        micro = []
        for s in range(0, len(rows_idx), c.micro_batch_size):
            sl = slice(s, s + c.micro_batch_size)
            micro.append(MicroBatch(tokens[sl], attn[sl], mask[sl], adv[sl], P, None if old is None else old[sl],
                                    None if ref is None else ref[sl], None if sampled is None else sampled[sl],
                                    max(num_items, 1.0), num_seqs))
        self._step_metrics = self._rollout_metrics(rows, seen, everything, truncated, refills, num_items,
                                                   len(rows_idx))
        return micro

    def _rollout_metrics(self, rows: list[Rollout], seen: list[Rollout], everything: Tensor, truncated: Tensor,
                         refills: int, num_items: float, trained: int) -> dict[str, float]:
        """The step's rollout figures: rewards, accuracy and tool use over every rank, accuracy over every row sampled
        (refills too); the lengths are this rank's."""
        c = self.cfg
        acc = [r.parts.get("accuracy") for r in seen if r.parts.get("accuracy") is not None]
        acc_sum, acc_n = all_reduce_sum(torch.tensor([float(sum(acc)), float(len(acc))], dtype=torch.float64)).tolist()
        lengths = torch.tensor([len(r.completion) for r in rows])
        local = torch.tensor([r.reward for r in rows], dtype=torch.float32)
        out = {
            "reward": everything.mean().item(),
            "reward_std": everything.std().item() if everything.numel() > 1 else 0.0,
            "accuracy": acc_sum / acc_n if acc_n else 0.0,
            "completion_length": lengths.float().mean().item(),
            "think_tokens": sum(r.think_tokens for r in rows) / len(rows),
            "closed_thoughts": sum(r.closed for r in rows) / len(rows),
            "truncated": truncated.float().mean().item(),
            "zero_std_groups": zero_std_fraction(local, c.num_generations),
            "refills": float(refills),
            "tokens": float(num_items),  # the global count, across ranks
            "trained_rows": float(trained) / len(rows),
        }
        turns = [r.turn for r in seen if r.turn is not None]
        if self.env_maker is not None:  # (every rank has tools or none: the all-reduce runs on all or none)
            sums = torch.tensor([[1.0, t.calls, t.calls > 0, t.tool_errors, t.malformed, t.tool_tokens, len(t.turns)]
                                 for t in turns], dtype=torch.float64).reshape(-1, 7).sum(0)
            n, calls, called, errors, malformed, tool_tokens, n_turns = all_reduce_sum(sums).tolist()
            n = max(n, 1.0)
            out["tools/calls_per_rollout"] = calls / n
            out["tools/call_rate"] = called / n
            out["tools/errors_per_rollout"] = errors / n
            out["tools/error_rate"] = errors / max(1.0, calls)
            out["tools/malformed_per_rollout"] = malformed / n
            out["tools/result_tokens"] = tool_tokens / n
            out["tools/turns"] = n_turns / n
        for name in c.rewards:
            vals = [r.parts.get(name) for r in rows if r.parts.get(name) is not None]
            if vals:
                out[f"rewards/{name}"] = sum(vals) / len(vals)
        return out

    # ------------------------------------------------------------------ loss
    def loss(self, model, m: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg
        logp, ent = token_logprobs(model, m.tokens, m.attn, temperature=c.temperature, start=m.P - 1, entropy=True)
        logp, ent = logp[:, m.P - 1 :], ent[:, m.P - 1 :]
        loss, metrics = policy_loss(
            logp, m.old, m.adv, m.mask, loss_type=c.loss_type, epsilon_low=c.epsilon,
            epsilon_high=c.epsilon_high if c.epsilon_high is not None else c.epsilon, ref_logp=m.ref, beta=c.beta,
            importance=c.importance_sampling_level, max_completion_length=c.max_completion_length,
            num_items_in_batch=m.num_items, num_sequences_in_batch=m.num_seqs, rollout_logp=m.sampled,
            rollout_is_cap=c.rollout_is_cap,
        )
        n = m.mask.sum().clamp(min=1)
        metrics["entropy"] = ((ent * m.mask).sum() / n).item()
        return loss, metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int, model, n: int | None = None, out_dir: Path | None = None) -> dict[str, float]:
        """Greedy held-out figures at `step`; with out_dir, also its samples and summary (eval.run's files)."""
        return eval_figures(evaluate(model, self.tok, self._eval_cfg(n or self.cfg.eval_n), out_dir=out_dir,
                                     progress=False))


def check_rollout_copy(cfg: GRPOConfig, train: TrainConfig) -> None:
    """A clear error, before anything loads, where rollouts from a quantized copy cannot run or cannot pay."""
    from sputnik import kernels

    if cfg.rollout_quantize == "none":
        return
    if not cfg.rollout_is_cap >= 1:
        raise ValueError(f"rollout_is_cap must be at least 1 (TRL's default is 2), not {cfg.rollout_is_cap}")
    if train.fsdp:
        raise ValueError("rollout_quantize: a policy sharded with FSDP has no whole weights on a rank to quantize; "
                         "use data parallel (fsdp: false) or rollout_quantize: none")
    if not torch.cuda.is_available() and not kernels.available():
        raise ValueError("rollout_quantize: sputnik's CPU kernels are not available here (they build with a C++ "
                         "compiler at first use); without them a quantized copy samples slower than the policy")


def _padded(rows: list[list[float]], L: int) -> Tensor:
    """[B, L] float rows, right-padded with zeros."""
    out = torch.zeros(len(rows), L)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r[:L], dtype=torch.float32)
    return out


def eval_figures(s) -> dict[str, float]:
    """The figures GRPO logs (as eval/*) of an evaluation's summary."""
    return {"accuracy": s.greedy_accuracy or 0.0, "format_rate": s.greedy_format_rate or 0.0,
            "completion_length": s.greedy_mean_length or 0.0, "think_tokens": s.greedy_think_tokens or 0.0,
            "accuracy_lenient": s.greedy_accuracy_lenient or 0.0, "language": s.greedy_language or 0.0,
            **({"follows_reasoning": s.greedy_follows_reasoning}
               if s.greedy_follows_reasoning is not None else {}),
            **({"tool_call_rate": s.greedy_tool_call_rate, "calls": s.greedy_calls,
                "tool_error_rate": s.greedy_tool_error_rate} if s.greedy_calls is not None else {})}


def _logged_eval(metrics: "Path", step: int) -> dict[str, float]:
    """The eval/* figures a run logged at `step` (a resumed run keeps its baseline)."""
    for row in read_rows(metrics):
        if row.get("step") == step and any(k.startswith("eval/") for k in row):
            return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
    return {}


def train_grpo(model_name: str, cfg: GRPOConfig, train: TrainConfig) -> GRPOSummary:
    """Load a model, run GRPO with the shared loop (resuming from out_dir's checkpoints if any), and evaluate greedy
    accuracy on held-out problems before and after. Writes out_dir/summary.json and returns it."""
    import json
    import time

    from sputnik.checkpoint import load_pretrained
    from sputnik.train.loop import Trainer
    from sputnik.train.lora import apply_lora

    start = time.perf_counter()
    check_rollout_copy(cfg, train)
    model, tok = load_pretrained(model_name)
    if cfg.lora_r:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, tuple(cfg.lora_target_modules))
    objective = GRPOObjective(model, tok, cfg, seed=train.seed)
    rank, _ = dist_info()
    evals: dict[int, dict[str, float]] = {}

    def run_eval(step: int, m) -> dict[str, float]:
        if step not in evals:  # each evaluation's samples kept (rank 0) to read beside its figures
            samples = Path(train.out_dir) / "eval" / f"step_{step:06d}" if rank == 0 else None
            evals[step] = objective.evaluate(step, m, out_dir=samples)
        return evals[step]

    trainer = Trainer(model, train, objective, evaluate=run_eval if cfg.eval_n else None,
                      eval_every=cfg.eval_every, tokenizer=tok)
    resumed = trainer.resume()
    before = {}
    if cfg.eval_n:
        before = _logged_eval(Path(train.out_dir) / "metrics.jsonl", 0) if resumed else run_eval(0, trainer.model)
    trainer.run()
    # A finished run asked again (a recipe's rerun) reads its last evaluation back instead of repeating it.
    last = Path(train.out_dir) / "eval" / f"step_{train.max_steps:06d}"
    if cfg.eval_n and resumed == train.max_steps and (last / "summary.json").is_file():
        after = eval_figures(load_summary(last))
    else:
        after = run_eval(train.max_steps, trainer.model) if cfg.eval_n else {}
    minutes = (time.perf_counter() - start) / 60
    if resumed:  # add the steps an earlier, interrupted session ran (their evaluations are not counted)
        rows = read_rows(Path(train.out_dir) / "metrics.jsonl")
        minutes += sum(r.get("seconds", 0.0) for r in rows if 0 < r.get("step", 0) <= resumed) / 60
    summary = GRPOSummary(model=model_name, task=cfg.task, before=before, after=after, minutes=round(minutes, 2),
                          steps=train.max_steps, resumed_from=resumed, eval_problems=cfg.eval_n)
    if rank == 0:
        out = Path(train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary
