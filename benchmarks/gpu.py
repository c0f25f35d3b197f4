"""The GPU checks, as one script for a lent GPU (a session may hold one for 15 minutes: run this whole, once).

1. Parity on CUDA: the default model's last-position logits on the GPU against the CPU's float32, for float32 and
   bfloat16 weights and for the GGUF's own Q4_1 blocks kept in GPU memory (`--quantize int4`: each product decodes
   the blocks with torch operators, kernels/dequant.py), relative L2 difference and greedy tokens equal over 32.
2. Decode speed on CUDA: B=1 greedy and B=32 (`--batch`; the JSON's "b32") sampled tok/s for sputnik's engine
   (float32, bfloat16, the blocks) and for transformers on the same GGUF (float32, bfloat16), with the ratios.

    python benchmarks/gpu.py [--model smollm2-135m-instruct] [--new-tokens 128] [--repeats 3] [--device cuda]

`--device cpu` runs the same code on the CPU (a dry run of the script where no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import machine
from decode import chat_prompts, median_time, transformers_rates
from sputnik.checkpoint import load_model
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.tokenizer import Tokenizer

VARIANTS = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "q4_1 blocks": (torch.float32, "int4")}


def parity(model, reference, chats: list[list[int]], tok, N: int, device: str) -> dict:
    """Last-position logits against the CPU float32 model's, and greedy tokens equal over N (prompts alone)."""
    with torch.no_grad():
        diffs = [float((model(torch.tensor([c], device=device))[0, -1].float().cpu() - want).norm() / want.norm())
                 for c, want in zip(chats, reference["logits"])]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    got = [c[0].token_ids for c in Engine(model, tok).generate(chats, params)]
    return {"logits_rel_diff_max": round(max(diffs), 6),
            "greedy_equal": sum(a == b for a, b in zip(got, reference["tokens"])), "of": len(chats)}


def speed(model, tok, chats: list[list[int]], N: int, repeats: int, device: str) -> dict:
    engine = Engine(model, tok, max_batch=len(chats))
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=N, temperature=0.7, top_p=0.95, ignore_eos=True, seed=0)
    engine.generate(chats[:2], SamplingParams(max_tokens=8, temperature=0))  # warm-up

    def run(prompts, params):
        engine.generate(prompts, params)
        if device != "cpu":
            torch.cuda.synchronize()

    return {"b1": N / median_time(lambda: run(chats[:1], greedy), repeats),
            "b32": len(chats) * N / median_time(lambda: run(chats, sampled), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for a dry run)")
    path, N, start = resolve(args.model), args.new_tokens, time.perf_counter()
    tok = Tokenizer.load(path)
    chats = chat_prompts(tok, args.batch)
    cpu = load_model(path)
    probe = chats[:8]
    with torch.no_grad():
        logits = [cpu(torch.tensor([c]))[0, -1] for c in probe]
    reference = {"logits": logits, "tokens": [c[0].token_ids for c in Engine(cpu).generate(
        probe, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))]}
    rows: dict[str, dict] = {}
    for name, (dtype, quantize) in VARIANTS.items():
        model = load_model(path, dtype=dtype, device=args.device, quantize=quantize)
        rows[f"sputnik {name}"] = {**parity(model, reference, probe, tok, 32, args.device),
                                   **speed(model, tok, chats, N, args.repeats, args.device)}
        del model
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows[f"transformers {name}"] = transformers_rates(path, tok.pad_id, chats, N, args.repeats, args.device, dtype)
    report(rows, args, time.perf_counter() - start)


def report(rows: dict[str, dict], args, seconds: float) -> None:
    print(f"\n{args.model} on {args.device}, {args.new_tokens} new tokens, median of {args.repeats} "
          f"({seconds:.0f} s in all)")
    print(machine.line())
    if args.device != "cpu":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'engine':<26}{'B=1 tok/s':>11}{f'B={args.batch} tok/s':>13}{'logits vs CPU':>15}{'greedy =':>10}")
    for name, r in rows.items():
        parity = f"{r['logits_rel_diff_max']:.2e}" if "of" in r else ""
        equal = f"{r['greedy_equal']}/{r['of']}" if "of" in r else ""
        print(f"{name:<26}{r['b1']:>11.1f}{r['b32']:>13.1f}{parity:>15}{equal:>10}")
    figures = {k.replace(" ", "_"): {f: round(v, 6) if isinstance(v, float) else v for f, v in r.items()}
               for k, r in rows.items()}
    for dtype in ("fp32", "bf16"):
        ours, theirs = rows[f"sputnik {dtype}"], rows[f"transformers {dtype}"]
        figures[f"{dtype}_b1_vs_transformers"] = round(ours["b1"] / theirs["b1"], 3)
        figures[f"{dtype}_b32_vs_transformers"] = round(ours["b32"] / theirs["b32"], 3)
    figures["q4_1_b1_vs_fp32"] = round(rows["sputnik q4_1 blocks"]["b1"] / rows["sputnik fp32"]["b1"], 3)
    figures.update(batch=args.batch, new_tokens=args.new_tokens, device=args.device, gpu=torch.cuda.get_device_name() if args.device != "cpu" else None,
                   machine=machine.describe())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
