"""Seconds per GRPO step of the default model (SmolLM2-135M, fp32): sputnik against TRL's GRPOTrainer, in one run.

The same model, task (2-digit addition, chat template, accuracy reward), prompts (in the same order), group size,
completion limit, loss (dapo, beta 0, one update per rollout) and full fine-tune on both sides; a step is one
generation round and one optimizer update. Medians over the steps after the first (warm-up).

sputnik's floor, from rates measured in the same run: the step's rollout tokens at sputnik's own sampled decode
speed (the rollout's shape: prompts x G rows, max-new-tokens each) plus 6 * params * trained tokens (prompt +
completion tokens through forward and backward, padding excluded) at the fp32 matmul rate of a training-like shape.
Both rates are measured right after each step, so each step is held to the machine's speed of that moment: on a
shared VM the speed drifts by 20-30% within minutes, and rates taken once at the end compared steps with another
machine. `vs_floor` is the median over the timed steps of step seconds / that step's floor.
With beta = 0 sputnik leaves rows whose advantage is 0 (every group whose rewards are all equal) out of the
forward/backward, which changes neither loss nor gradient; TRL runs every row. "trained tokens" counts what each side
actually ran, so on a task the model mostly fails (all-zero groups) sputnik's update is far smaller than TRL's.

    python benchmarks/grpo_step.py [--model smollm2-135m-instruct] [--steps 5] [--prompts 4] [--generations 8]
                                   [--max-new-tokens 64] [--micro-batch 8] [--skip-trl]

Needs `pip install -e '.[bench]'` (transformers, trl, datasets) for the TRL column. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import matmul_gflops, median_time  # noqa: E402

import machine  # noqa: E402
from sputnik.checkpoint import load_pretrained, save_model  # noqa: E402
from sputnik.engine import Engine, SamplingParams  # noqa: E402
from sputnik.train.grpo import GRPOConfig, GRPOObjective  # noqa: E402
from sputnik.train.loop import TrainConfig, Trainer  # noqa: E402

LOSS = dict(loss_type="dapo", beta=0.0, epsilon=0.2, scale_rewards="group", num_iterations=1)
LR = 1e-6


def timed(values: list[float]) -> list[float]:
    """The steps that count: all but the first (warm-up) when there are several."""
    return values[1:] if len(values) > 1 else values


def med(values: list[float]) -> float:
    return statistics.median(timed(values))


# ---------------------------------------------------------------- sputnik


def run_sputnik(model, tok, args, out_dir: str) -> tuple[GRPOObjective, list[dict], list[int]]:
    """Time args.steps GRPO steps; returns the objective, per-step figures and the problems used, in order."""
    cfg = GRPOConfig(task="arithmetic", template="chat", prompts_per_step=args.prompts, num_generations=args.generations,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     loss_type=LOSS["loss_type"], beta=LOSS["beta"], epsilon=LOSS["epsilon"],
                     scale_rewards=LOSS["scale_rewards"], num_iterations=LOSS["num_iterations"],
                     dynamic_sampling=False, rewards={"accuracy": 1.0}, micro_batch_size=args.micro_batch, eval_n=0)
    objective = GRPOObjective(model, tok, cfg, seed=0)
    trainer = Trainer(model, TrainConfig(out_dir=out_dir, max_steps=args.steps, lr=LR, progress=False, plot_every=0,
                                         save_every=0), objective, tokenizer=tok)
    counts: dict[str, float] = {}
    used: list[int] = []
    prepare, next_prompts = objective.prepare, objective._next_prompts

    def counting_next_prompts(n):  # the step's problems, to count the prompt tokens of every rollout row
        idx = next_prompts(n)
        used.extend(idx)
        counts["prompt"] = float(args.generations * sum(len(objective.prompts[i][0]) for i in idx))
        return idx

    def counting_prepare(step, m):
        micros = prepare(step, m)
        # The rows that go through forward/backward (sputnik leaves out rows with advantage 0 when beta = 0);
        # attn is True on their real tokens: the prompt (left-padded to P) and the completion after it.
        counts["trained"] = float(sum(mb.attn.sum().item() for mb in micros))
        counts["padded"] = float(sum(mb.tokens.numel() for mb in micros))
        return micros

    objective._next_prompts, objective.prepare = counting_next_prompts, counting_prepare
    rows = []
    params_count = sum(p.numel() for p in model.parameters())
    for step in range(args.steps):  # train_step directly: Trainer.run() would also save a checkpoint at the end
        r = trainer.train_step(step)
        generated = r["completion_length"] * args.prompts * args.generations  # every rollout row's tokens
        # The floor's rates, now: decode at this step's prompts (every row to max-new-tokens), matmul.
        decode = decode_tok_s(model, tok, [objective.prompts[i][0] for i in used[-args.prompts :]], args, repeats=1)
        gflops = matmul_gflops(model.cfg.dim, model.cfg.inter_dim, batch=512, repeats=5)
        floor_rollout = generated / decode
        floor_update = 6 * params_count * counts["trained"] / (gflops * 1e9)
        rows.append({"seconds": r["seconds"], "rollout_seconds": r["prepare_seconds"],
                     "update_seconds": r["seconds"] - r["prepare_seconds"], "rollout_tokens": generated,
                     "trained_tokens": counts["trained"], "padded_tokens": counts["padded"],
                     "all_tokens": counts["prompt"] + generated, "trained_rows": r.get("trained_rows", 1.0),
                     "reward": r["reward"], "decode_tok_s": decode, "matmul_gflop_s": gflops,
                     "floor_rollout_seconds": floor_rollout, "floor_update_seconds": floor_update,
                     "floor_seconds": floor_rollout + floor_update,
                     "vs_floor": r["seconds"] / (floor_rollout + floor_update)})
        model.train()
        print(f"  sputnik step {step + 1}: {r['seconds']:.2f}s (rollout {r['prepare_seconds']:.2f}s), "
              f"{generated:.0f} generated, {counts['trained']:.0f} trained tokens "
              f"({rows[-1]['trained_rows']:.0%} of rows), reward {r['reward']:.3f}; "
              f"floor {rows[-1]['floor_seconds']:.2f}s (decode {decode:.1f} tok/s, matmul {gflops:.1f} GFLOP/s)",
              flush=True)
    return objective, rows, used


# ---------------------------------------------------------------- TRL


def run_trl(hf_dir: Path, problems, task, sputnik_prompts: list[list[int]], args, out_dir: str) -> list[dict]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    messages = [task.render(p, "chat") for p in problems]  # [user] with the task's suffix; TRL applies the template
    same = all(hf_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
               for m, ids in zip(messages, sputnik_prompts))
    if not same:
        print("  warning: the HF tokenizer's chat template gives other prompt tokens than sputnik's", flush=True)
    data = Dataset.from_list([{"prompt": m, "idx": i} for i, m in enumerate(messages)])

    def accuracy(completions, idx, **_):  # sputnik's accuracy reward: the task's verifier
        marks["prompts"] = sorted(set(idx))
        return [task.verify(problems[i], c[0]["content"]) for c, i in zip(completions, idx)]

    config = TRLConfig(
        output_dir=out_dir, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, gradient_accumulation_steps=1, steps_per_generation=1, max_steps=args.steps,
        shuffle_dataset=False, gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0, **LOSS)

    rows: list[dict] = []
    marks: dict = {}

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            marks.update(begin=time.perf_counter(), rollout=0.0, generated=0.0, trained=0.0)

        def on_step_end(self, *_, **__):
            rows.append({"seconds": time.perf_counter() - marks["begin"], "rollout_seconds": marks["rollout"],
                         "rollout_tokens": marks["generated"], "trained_tokens": marks["trained"],
                         "prompts": marks.get("prompts")})

    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=data, processing_class=hf_tok,
                          callbacks=[StepTimer()])
    trainer.remove_callback(transformers.PrinterCallback)  # its per-step log dicts would bury the table
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **kw):  # TRL's counterpart of sputnik's prepare: sampling, rewards, advantages
        t = time.perf_counter()
        out = generate(*a, **kw)
        marks["rollout"] += time.perf_counter() - t
        generated = float(out["completion_mask"].sum())  # up to and including the first EOS, as sputnik counts
        marks["generated"] += generated
        marks["trained"] += generated + float(out["prompt_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    for i, r in enumerate(rows):
        if r["prompts"] != list(range(i * args.prompts, (i + 1) * args.prompts)):
            print(f"  warning: TRL step {i + 1} trained on dataset rows {r['prompts']}, not sputnik's", flush=True)
        r["update_seconds"] = r["seconds"] - r["rollout_seconds"]
        print(f"  TRL step {i + 1}: {r['seconds']:.2f}s (rollout {r['rollout_seconds']:.2f}s), "
              f"{r['rollout_tokens']:.0f} generated, {r['trained_tokens']:.0f} trained tokens", flush=True)
    return rows


# ---------------------------------------------------------------- floor rates


def decode_tok_s(model, tok, prompts: list[list[int]], args, repeats: int = 3) -> float:
    """sputnik's sampled decode speed at the rollout's shape: every row runs the full max-new-tokens."""
    engine = Engine(model, tok, max_batch=len(prompts) * args.generations)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=1.0, n=args.generations, ignore_eos=True,
                            seed=0)
    engine.generate(prompts, SamplingParams(max_tokens=4, n=args.generations, seed=0))  # warm up
    return len(prompts) * args.generations * args.max_new_tokens / median_time(
        lambda: engine.generate(prompts, params), repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8, help="sputnik's sequences per forward/backward")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]  # another busy process on the cores skews every figure: it is reported

    model, tok = load_pretrained(args.model)
    params_count = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        hf_dir = save_model(model, Path(tmp) / "hf", tokenizer=tok)  # the untrained weights, for TRL

        print("sputnik GRPO", flush=True)
        objective, sp, used = run_sputnik(model, tok, args, str(Path(tmp) / "sputnik"))
        problems = [objective.problems[i] for i in used]
        prompts = [objective.prompts[i][0] for i in used]
        task = objective.task
        del objective
        model.zero_grad(set_to_none=True)

        trl = None
        if not args.skip_trl:
            print("TRL GRPOTrainer", flush=True)
            trl = run_trl(hf_dir, problems, task, prompts, args, str(Path(tmp) / "trl"))

    decode, gflops = med([r["decode_tok_s"] for r in sp]), med([r["matmul_gflop_s"] for r in sp])

    def col(rows, key):
        return med([r[key] for r in rows])

    n_timed = len(timed(sp))
    print(f"\nGRPO step, SmolLM2-135M fp32, 2-digit addition, {args.prompts} prompts x G={args.generations}, "
          f"<= {args.max_new_tokens} new tokens, dapo, full fine-tune; median of {n_timed} step(s) after warm-up; "
          f"{torch.get_num_threads()} threads")
    print(machine.line())
    print(f"floor rates (median of those measured after each step): decode {decode:.1f} tok/s (sputnik, "
          f"B={args.prompts * args.generations} sampled), matmul {gflops:.1f} GFLOP/s (512 rows), "
          f"{params_count / 1e6:.1f}M params")
    print(f"sputnik trained {med([r['trained_rows'] for r in sp]):.0%} of the rollout rows (advantage != 0), TRL all")
    print(f"{'':<18}{'step s':>9}{'rollout s':>11}{'update s':>10}{'gen tokens':>12}{'trained tok':>13}{'vs sputnik':>12}")
    s_med = col(sp, "seconds")

    def line(name, step, rollout, update, gen, trained):
        print(f"{name:<18}{step:>9.2f}{rollout:>11.2f}{update:>10.2f}{gen:>12.0f}{trained:>13.0f}{step / s_med:>12.2f}")

    line("sputnik", s_med, col(sp, "rollout_seconds"), col(sp, "update_seconds"), col(sp, "rollout_tokens"),
         col(sp, "trained_tokens"))
    if trl:
        line("TRL GRPOTrainer", col(trl, "seconds"), col(trl, "rollout_seconds"), col(trl, "update_seconds"),
             col(trl, "rollout_tokens"), col(trl, "trained_tokens"))
    line("sputnik floor", col(sp, "floor_seconds"), col(sp, "floor_rollout_seconds"), col(sp, "floor_update_seconds"),
         col(sp, "rollout_tokens"), col(sp, "trained_tokens"))

    def rounded(rows, key, nd=3):
        return [round(r[key], nd) if r.get(key) is not None else None for r in rows]

    figures = {
        "machine": machine.describe(),
        "vs_trl": round(s_med / col(trl, "seconds"), 3) if trl else None,
        "vs_floor": round(col(sp, "vs_floor"), 3),
        "vs_floor_of_medians": round(s_med / col(sp, "floor_seconds"), 3),
        "rollout_vs_trl": round(col(sp, "rollout_seconds") / col(trl, "rollout_seconds"), 3) if trl else None,
        "sputnik_step_s": round(s_med, 3),
        "sputnik_rollout_s": round(col(sp, "rollout_seconds"), 3),
        "sputnik_update_s": round(col(sp, "update_seconds"), 3),
        "trl_step_s": round(col(trl, "seconds"), 3) if trl else None,
        "trl_rollout_s": round(col(trl, "rollout_seconds"), 3) if trl else None,
        "trl_update_s": round(col(trl, "update_seconds"), 3) if trl else None,
        "floor_s": round(col(sp, "floor_seconds"), 3),
        "floor_rollout_s": round(col(sp, "floor_rollout_seconds"), 3),
        "floor_update_s": round(col(sp, "floor_update_seconds"), 3),
        "decode_tok_s": round(decode, 2),
        "matmul_gflop_s": round(gflops, 2),
        "params": params_count,
        "rollout_tokens": col(sp, "rollout_tokens"),
        "trained_tokens": col(sp, "trained_tokens"),
        "sputnik_steps_s": rounded(sp, "seconds"),
        "sputnik_rollout_steps_s": rounded(sp, "rollout_seconds"),
        "sputnik_rollout_tokens": rounded(sp, "rollout_tokens", 0),
        "sputnik_trained_tokens": rounded(sp, "trained_tokens", 0),
        "sputnik_padded_tokens": rounded(sp, "padded_tokens", 0),
        "sputnik_all_rows_tokens": rounded(sp, "all_tokens", 0),
        "sputnik_trained_rows": rounded(sp, "trained_rows"),
        "floor_steps_s": rounded(sp, "floor_seconds"),
        "vs_floor_steps": rounded(sp, "vs_floor"),
        "decode_steps_tok_s": rounded(sp, "decode_tok_s", 1),
        "matmul_steps_gflop_s": rounded(sp, "matmul_gflop_s", 1),
        "trl_steps_s": rounded(trl, "seconds") if trl else None,
        "trl_rollout_steps_s": rounded(trl, "rollout_seconds") if trl else None,
        "trl_rollout_tokens": rounded(trl, "rollout_tokens", 0) if trl else None,
        "trl_trained_tokens": rounded(trl, "trained_tokens", 0) if trl else None,
        "steps": args.steps, "prompts": args.prompts, "generations": args.generations,
        "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch, "loss_type": LOSS["loss_type"],
        "threads": torch.get_num_threads(), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
