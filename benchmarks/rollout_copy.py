"""Do GRPO's rollouts pay for a quantized copy of the policy? (issue 19; GRPO's `rollout_quantize`)

A GRPO step samples its rollouts from the policy as the last update left it. The policy trains in fp32, so its
rollouts run the fp32 native step; a copy in Q8_0 blocks (checkpoint.quantized_copy), made again after every update,
decodes from a quarter of the bytes. In one run, for a rollout of `make r1`'s shape (rows = prompts x G, sampled at
temperature 1, a fixed number of new tokens), this times the fp32 rollouts, making the copy, and the copy's rollouts
(its KV cache float16, as GRPO keeps it), medians of --repeats. `pays` is whether copy + its rollouts take less than
the fp32 rollouts. The copy's samples are off-policy by its rounding: the fp32 policy's log-probs of the copy's tokens
(train.logprobs, the trainer's own function) against the copy's, as the share of tokens whose ratio leaves DAPO's
clip range [0.8, 1.28] (GRPO weighs the copy's tokens by truncated importance sampling).

Then whole GRPO steps of that shape with recipes/r1-zero.yaml's GRPO settings (its task, thinking, format + accuracy
rewards, loss, learning rate), --steps with `rollout_quantize: none` and as many with `int8`, each run from its own
copy of the loaded policy, in turn: seconds per step and in its prepare phase (rollouts, the copy included, rewards,
padding; medians, each run's first step left out as warm-up), rewards, and the importance weights' figures. The
update phases differ a little: rows whose group's rewards are all equal are not trained, and the runs sample
different rows.

    python benchmarks/rollout_copy.py [--model smollm2-135m-instruct] [--rows 48] [--new-tokens 128] [--repeats 3]
                                      [--steps 4]

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import QUESTIONS, median_time  # noqa: E402

import machine  # noqa: E402
from sputnik.checkpoint import load_pretrained, quantized_copy  # noqa: E402
from sputnik.engine import Engine, SamplingParams  # noqa: E402
from sputnik.engine.native import auto_cache_dtype  # noqa: E402
from sputnik.train.grpo import GRPOConfig, GRPOObjective  # noqa: E402
from sputnik.train.logprobs import token_logprobs  # noqa: E402
from sputnik.train.loop import TrainConfig, Trainer  # noqa: E402


def off_policy(model, prompts: list[list[int]], completions) -> tuple[float, float]:
    """(share of sampled tokens whose fp32/copy probability ratio leaves [0.8, 1.28], mean |log ratio|)."""
    outside, total, gap = 0, 0, 0.0
    for prompt, c in zip(prompts, completions):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            mine = token_logprobs(model, ids)[0, len(prompt) - 1:]
        log_ratio = mine - torch.tensor(c.logprobs)
        outside += int(((log_ratio < torch.log(torch.tensor(0.8))) | (log_ratio > torch.log(torch.tensor(1.28))))
                       .sum())
        total, gap = total + log_ratio.numel(), gap + float(log_ratio.abs().sum())
    return outside / total, gap / total


# r1-zero's GRPO: its rewards (format and accuracy) give a 135M model's groups a spread, so both runs train.
R1_ZERO = Path(__file__).resolve().parents[1] / "recipes" / "r1-zero.yaml"
R1_ZERO_GRPO = ("task", "template", "think", "suffix", "rewards", "grading", "num_generations", "temperature",
                "loss_type", "scale_rewards", "epsilon", "epsilon_high", "beta", "micro_batch_size")


def grpo_steps(model, tok, args, rollout_quantize: str) -> list[dict]:
    """The metrics rows of args.steps GRPO steps from a copy of `model`, its rollouts sampled as asked."""
    recipe = yaml.safe_load(R1_ZERO.read_text())
    cfg = GRPOConfig(**{k: recipe[k] for k in R1_ZERO_GRPO}, prompts_per_step=args.rows // recipe["num_generations"],
                     max_completion_length=args.new_tokens, eval_n=0, rollout_quantize=rollout_quantize)
    policy = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as out:
        train = TrainConfig(out_dir=out, max_steps=args.steps, lr=recipe["lr"], progress=False, plot_every=0,
                            save_every=0)
        Trainer(policy, train, GRPOObjective(policy, tok, cfg, seed=0), tokenizer=tok).run()
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if '"seconds"' in line]


def step_figures(rows: list[dict]) -> dict[str, float]:
    timed = rows[1:] if len(rows) > 1 else rows
    out = {"step_s": statistics.median(r["seconds"] for r in timed),
           "prepare_s": statistics.median(r["prepare_seconds"] for r in timed),
           "update_s": statistics.median(r["seconds"] - r["prepare_seconds"] for r in timed),
           "trained_rows": statistics.mean(r["trained_rows"] for r in timed),  # share of the rows with a gradient
           "reward": statistics.mean(r["reward"] for r in rows)}
    for key in ("rollout_is/weight", "rollout_is/capped", "rollout_is/abs_log_ratio"):
        if key in rows[-1]:
            out[key.split("/")[1]] = statistics.mean(r[key] for r in rows)
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=48, help="rollouts per step (make r1: 6 prompts x 8)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps each way (0: none)")
    args = ap.parse_args()
    print(machine.line(), flush=True)

    model, tok = load_pretrained(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
               for q in (QUESTIONS * args.rows)[: args.rows]]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    fp32 = Engine(model, tok, max_batch=args.rows)
    fp32.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    fp32_s = median_time(lambda: fp32.generate(prompts, params), args.repeats)
    copy_s = median_time(lambda: quantized_copy(model), args.repeats)
    q8 = quantized_copy(model)
    engine = Engine(q8, tok, max_batch=args.rows, kv_dtype=auto_cache_dtype(q8))  # as GRPO samples from it
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    sampled = [c[0] for c in engine.generate(prompts, params)]
    copy_rollout_s = median_time(lambda: engine.generate(prompts, params), args.repeats)
    outside, gap = off_policy(model, prompts, sampled)

    tokens = args.rows * args.new_tokens
    print(f"\n{args.rows} rollouts x {args.new_tokens} new tokens, sampled at temperature 1, median of {args.repeats}")
    print("| | seconds | tok/s |\n|---|---|---|")
    print(f"| fp32 policy (native step) | {fp32_s:.2f} | {tokens / fp32_s:.1f} |")
    print(f"| making the Q8_0 copy | {copy_s:.2f} | |")
    print(f"| Q8_0 copy's rollouts | {copy_rollout_s:.2f} | {tokens / copy_rollout_s:.1f} |")
    print(f"| copy + its rollouts | {copy_s + copy_rollout_s:.2f} | {tokens / (copy_s + copy_rollout_s):.1f} |")
    print(f"off-policy: {outside:.1%} of the copy's tokens leave the clip range [0.8, 1.28] under the fp32 policy; "
          f"mean |log ratio| {gap:.4f}")
    figures = {"rows": args.rows, "new_tokens": args.new_tokens, "fp32_rollout_s": round(fp32_s, 3),
               "copy_s": round(copy_s, 3), "copy_rollout_s": round(copy_rollout_s, 3),
               "copy_total_vs_fp32": round((copy_s + copy_rollout_s) / fp32_s, 3),
               "pays": copy_s + copy_rollout_s < fp32_s, "tokens_outside_clip": round(outside, 4),
               "mean_abs_log_ratio": round(gap, 5)}
    if args.steps:
        runs = {q: step_figures(grpo_steps(model, tok, args, q)) for q in ("none", "int8")}
        print(f"\nGRPO, {args.steps} steps each way (medians leave out each run's first step)")
        print("| rollouts | step s | prepare s | update s | rows trained | mean reward | IS weight | capped | "
              "mean abs log ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for q, f in runs.items():
            print(f"| {q} | {f['step_s']:.2f} | {f['prepare_s']:.2f} | {f['update_s']:.2f} | {f['trained_rows']:.2f} | "
                  f"{f['reward']:.3f} | {f.get('weight', 1):.4f} | {f.get('capped', 0):.4f} | "
                  f"{f.get('abs_log_ratio', 0):.4f} |")
        figures.update(grpo_none=runs["none"], grpo_int8=runs["int8"],
                       grpo_prepare_int8_vs_none=round(runs["int8"]["prepare_s"] / runs["none"]["prepare_s"], 3),
                       grpo_step_int8_vs_none=round(runs["int8"]["step_s"] / runs["none"]["step_s"], 3))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
