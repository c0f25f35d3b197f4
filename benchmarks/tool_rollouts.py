"""Multi-turn rollouts with a calculator against the same number of tokens sampled without tools, in one run.

The tools side is GRPO's: `tool_rollouts` over prompts x G rows, each row its own rollout (a turn that writes a call
pauses while the calculator runs, the result is appended as the chat template writes a tool message, and the row
resumes from the prefix cache), an engine with GRPO's prefix cache. The plain side is GRPO's tool-free sampling: one
`engine.generate` of the same prompts with n = G, every row sampling as many tokens as the tools side's rows sampled on
average (ignore_eos), so both sides sample the same number of model tokens in the same batch. The two alternate, the
same seeds every repeat, medians taken, so load on a shared machine hits both alike. `ratio` is the tools side's
seconds per sampled token over the plain side's (goal, issue 20: at most 1.3).

The prompts: the tools offered (the fallback's Hermes system message for SmolLM2), two solved examples (a call, its
result, the answer) and a new 4-digit product; the examples are what make a 135M model call the calculator at all
(with one, none of 8 rows called). The engine's prefix cache and prefill blocks are as GRPO sets them
(multiturn.prefix_cache_mb, RESUME_BLOCK).
The tools side's breakdown: seconds inside engine steps, seconds waiting with only tools running, tokens prefilled
(prompt, tool results and glue, and whatever the prefix cache missed) against the plain side's.

    python benchmarks/tool_rollouts.py [--model smollm2-135m-instruct] [--prompts 2] [--generations 4]
                                       [--max-new-tokens 48] [--max-turns 2] [--repeats 3] [--temperature 0.5]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import machine
import torch

from sputnik.checkpoint import load_model
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.multiturn import RESUME_BLOCK, AgentConfig, MultiTurn, prefix_cache_mb, tool_rollouts
from sputnik.tokenizer import Tokenizer
from sputnik.tools.env import environment_maker
from sputnik.tools.render import ToolPlan, plan_of, tool_prompt


def solved(a: int, b: int) -> list[dict]:
    """One worked exchange: the question, the calculator call, its result, the answer."""
    args = json.dumps({"expression": f"{a} * {b}"})
    return [{"role": "user", "content": f"What is {a} * {b}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": args}}]},
            {"role": "tool", "content": str(a * b), "tool_call_id": "call_0"},
            {"role": "assistant", "content": f"{a} * {b} = {a * b}. The answer is \\boxed{{{a * b}}}."}]


def prompts(tok: Tokenizer, plan: ToolPlan, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(1000, 10000), rng.randrange(1000, 10000)
        msgs = solved(1234, 5678) + solved(4321, 8765) + [{"role": "user", "content": f"What is {a} * {b}?"}]
        out.append(tok.encode(tool_prompt(msgs, tok, plan), add_special_tokens=False))
    return out


def counted(engine: Engine) -> list:
    """[seconds inside engine.step, steps], kept up to date as the engine steps (observes, changes nothing)."""
    seen = [0.0, 0]
    step = engine.step

    def timed_step():
        t = time.perf_counter()
        out = step()
        seen[0] += time.perf_counter() - t
        seen[1] += 1
        return out

    engine.step = timed_step
    return seen


def with_tools(model, tok, ids: list[list[int]], args) -> tuple[float, list[MultiTurn], dict]:
    """(seconds, rollouts, breakdown) of one round of rollouts with the calculator."""
    G, maker = args.generations, environment_maker(["calculator"])
    longest = max(len(p) for p in ids) + args.max_new_tokens * args.max_turns
    engine = Engine(model, tok, max_batch=len(ids) * G, prefix_cache_mb=prefix_cache_mb(model, len(ids) * G, longest),
                    prefill_block=RESUME_BLOCK)
    stepping = counted(engine)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=1)
    agent = AgentConfig(max_turns=args.max_turns, max_total_tokens=args.max_new_tokens * args.max_turns)
    rows = [p for p in ids for _ in range(G)]
    t = time.perf_counter()
    outs = tool_rollouts(engine, rows, params, [maker(None) for _ in rows], agent)
    seconds = time.perf_counter() - t
    prefilled = engine.stats["prompt_tokens"] - engine.stats["prefix_hit_tokens"]
    return seconds, outs, {"step_s": stepping[0], "steps": stepping[1], "prefilled": prefilled}


def without_tools(model, tok, ids: list[list[int]], args, tokens_per_row: int) -> tuple[float, int]:
    """(seconds, engine steps) of one round of plain sampling: G rows of each prompt, tokens_per_row tokens each."""
    engine = Engine(model, tok, max_batch=len(ids) * args.generations)
    stepping = counted(engine)
    params = SamplingParams(max_tokens=tokens_per_row, temperature=args.temperature, seed=1, n=args.generations,
                            ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(ids, params)
    seconds = time.perf_counter() - t
    assert all(len(c.token_ids) == tokens_per_row for row in outs for c in row)
    return seconds, stepping[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="per turn")
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.5)
    args = ap.parse_args()
    path = resolve(args.model)
    tok = Tokenizer.load(path)
    model = load_model(path, dtype=torch.float32)
    plan = plan_of(environment_maker(["calculator"])(None).specs(), tok)
    ids = prompts(tok, plan, args.prompts)
    rows = args.prompts * args.generations

    Engine(model, tok).generate(ids[:1], SamplingParams(max_tokens=4, temperature=0))  # first-forward costs
    tools_s, plain_s, steps_s, prefilled = [], [], [], []
    for _ in range(args.repeats):  # the same seeds: every tools round samples the same tokens
        s, outs, info = with_tools(model, tok, ids, args)
        tools_s.append(s)
        steps_s.append(info["step_s"])
        prefilled.append(info["prefilled"])
        per_row = max(1, round(sum(sum(o.own) for o in outs) / rows))
        plain, plain_steps = without_tools(model, tok, ids, args, per_row)
        plain_s.append(plain)
    sampled = sum(sum(o.own) for o in outs)
    tools_t, plain_t, step_t = statistics.median(tools_s), statistics.median(plain_s), statistics.median(steps_s)
    ratio = (tools_t / sampled) / (plain_t / (per_row * rows))
    calls = sum(o.calls for o in outs)
    figures = {
        "machine": machine.describe(), "model": args.model, "rows": rows, "prompt_tokens": round(statistics.mean(
            len(p) for p in ids), 1), "max_new_tokens": args.max_new_tokens, "max_turns": args.max_turns,
        "temperature": args.temperature, "repeats": args.repeats,
        "calls_per_rollout": round(calls / rows, 3), "call_rate": round(sum(o.calls > 0 for o in outs) / rows, 3),
        "tool_errors": sum(o.tool_errors for o in outs), "turns_per_rollout": round(
            sum(len(o.turns) for o in outs) / rows, 3),
        "tools_sampled_tokens": sampled, "tools_inserted_tokens": sum(o.tool_tokens for o in outs),
        "plain_sampled_tokens": per_row * rows,
        "tools_s": round(tools_t, 3), "tools_in_steps_s": round(step_t, 3), "tools_waiting_s": round(tools_t - step_t, 3),
        "tools_prefilled_tokens": int(statistics.median(prefilled)), "plain_prefilled_tokens": sum(len(p) for p in ids),
        "tools_steps": info["steps"], "plain_steps": plain_steps, "plain_s": round(plain_t, 3), "tools_s_all": [round(x, 3) for x in tools_s],
        "plain_s_all": [round(x, 3) for x in plain_s], "ratio": round(ratio, 3),
    }
    print(f"\n{args.model} fp32: {args.prompts} prompts x {args.generations} rows, up to {args.max_turns} turns of "
          f"{args.max_new_tokens} tokens, T {args.temperature}, median of {args.repeats}; "
          f"{torch.get_num_threads()} threads")
    print(machine.line())
    print(f"{'side':<12}{'seconds':>10}{'sampled':>10}{'inserted':>10}{'prefilled':>11}{'steps':>8}{'ms/token':>10}")
    print(f"{'tools':<12}{tools_t:>10.2f}{sampled:>10}{figures['tools_inserted_tokens']:>10}"
          f"{figures['tools_prefilled_tokens']:>11}{info['steps']:>8}{tools_t / sampled * 1e3:>10.1f}")
    print(f"{'no tools':<12}{plain_t:>10.2f}{per_row * rows:>10}{0:>10}{figures['plain_prefilled_tokens']:>11}"
          f"{plain_steps:>8}{plain_t / (per_row * rows) * 1e3:>10.1f}")
    print(f"calls per rollout {figures['calls_per_rollout']}, call rate {figures['call_rate']}, tool errors "
          f"{figures['tool_errors']}, turns {figures['turns_per_rollout']}; tools side: {step_t:.2f} s in engine "
          f"steps, {tools_t - step_t:.2f} s outside them (tools, parsing, glue); ratio {ratio:.3f} (goal <= 1.3)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
