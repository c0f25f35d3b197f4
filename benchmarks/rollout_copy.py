"""Do GRPO's rollouts pay for a quantized copy of the policy? (issue 19)

A GRPO step samples its rollouts from the policy as the last update left it. The policy trains in fp32, so its
rollouts run the fp32 native step; a copy in Q8_0 blocks (quantize_state of its state dict, then build_model), made
again after every update, decodes from a quarter of the bytes. In one run, for a rollout of `make r1`'s shape
(rows = prompts x G, sampled at temperature 1, a fixed number of new tokens), this times the fp32 rollouts, making
the copy, and the copy's rollouts, medians of --repeats. `pays` is whether copy + its rollouts take less than the
fp32 rollouts. The copy's samples are off-policy by its rounding: the fp32 policy's log-probs of the copy's tokens
(train.logprobs, the trainer's own function) against the copy's, as the share of tokens whose ratio leaves DAPO's
clip range [0.8, 1.28] (such tokens would train with a clipped or biased ratio).

    python benchmarks/rollout_copy.py [--model smollm2-135m-instruct] [--rows 48] [--new-tokens 128] [--repeats 3]

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import QUESTIONS, median_time  # noqa: E402

import machine  # noqa: E402
from sputnik.checkpoint import build_model, load_pretrained, quantize_state  # noqa: E402
from sputnik.engine import Engine, SamplingParams  # noqa: E402
from sputnik.train.logprobs import token_logprobs  # noqa: E402


def quantized_copy(model):
    """The policy's matrices in Q8_0 blocks, as a rollout engine would take them after an update."""
    return build_model(model.cfg, quantize_state(model.state_dict(), "Q8_0"))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=48, help="rollouts per step (make r1: 6 prompts x 8)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
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
    copy = Engine(quantized_copy(model), tok, max_batch=args.rows)
    copy.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    sampled = [c[0] for c in copy.generate(prompts, params)]
    copy_rollout_s = median_time(lambda: copy.generate(prompts, params), args.repeats)
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
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
