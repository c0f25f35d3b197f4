"""Decoding after a long prompt: the KV cache's dtype (float32 or bfloat16) against llama.cpp's float16, one run.

The default model's Q4_1 GGUF, loaded as `sputnik chat` loads it (blocks kept, float32 around them): at a few
thousand cached tokens each decoded token reads the whole cache (SmolLM2-135M: 45 KB a token in float32, half that
in bfloat16) besides the 84 MB of weights, so the cache's dtype sets much of the step's cost. For each prompt length:
prefill tok/s, then decode tok/s after the prompt (from the first token on), B=1 greedy and B=8 sampled (eight
samples of the prompt: eight rows of the same length), for `--kv-dtype float32` and `bfloat16`. llama.cpp
(llama-cpp-python, the bench extra; its default float16 cache) runs B=1 in a child process, in rounds that alternate
with sputnik's two caches so all see the same phase of a noisy machine; the ratios are medians of the rounds'. The
quality check: greedy tokens with the bfloat16 cache equal to the float32 cache's before they first differ.

    python benchmarks/long_context.py [--lengths 512 2048] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import machine
from sputnik.checkpoint import load_model
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.tokenizer import Tokenizer

CACHES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange salt, "
        "grain and cloth. Over the centuries the market grew into a town, the town into a city, and each generation "
        "left its mark on the streets, the bridges and the houses along the water. ")


def long_prompt(tok: Tokenizer, length: int) -> list[int]:
    """A chat prompt of about `length` tokens: a long text to summarise."""
    body = TEXT * (length // 40 + 1)
    ids = tok.apply_chat_template([{"role": "user", "content": "Summarise this text:\n\n" + body}], tokenize=True)
    while len(ids) > length:
        body = body[: int(len(body) * length / len(ids)) - 1]
        ids = tok.apply_chat_template([{"role": "user", "content": "Summarise this text:\n\n" + body}], tokenize=True)
    return ids


def sputnik_run(engine: Engine, prompt: list[int], rows: int, N: int) -> dict:
    """Prefill tok/s, then decode tok/s from the first sampled token on, over `rows` samples of the prompt."""
    params = SamplingParams(max_tokens=N + 1, n=rows, temperature=0 if rows == 1 else 0.7, top_p=0.95, seed=0,
                            ignore_eos=True)
    start, first, tokens = time.perf_counter(), None, []
    for delta in engine.stream([prompt], params):
        if first is None:
            first = time.perf_counter()
        if delta.sample == 0:
            tokens.append(delta.token_id)
    end = time.perf_counter()
    return {"prefill": len(prompt) / (first - start), "decode": rows * N / (end - first), "tokens": tokens}


def llamacpp_run(path: str, prompt: list[int], N: int) -> dict:
    """The same for llama.cpp at B=1 (greedy), its cache float16, n_ctx just above the prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + N + 16, n_batch=512, n_threads=torch.get_num_threads(),
                verbose=False)
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    first = time.perf_counter()
    tokens = []
    for _ in range(N + 1):
        tokens.append(llm.sample(temp=0.0))
        llm.eval([tokens[-1]])
    end = time.perf_counter()
    # its first token's sampling is in the decode time, as sputnik's is not: one token of N + 1, within the noise
    return {"prefill": len(prompt) / (first - start), "decode": (N + 1) / (end - first), "tokens": tokens}


def llamacpp_child(path: Path, prompt: list[int], N: int) -> tuple[dict | None, str]:
    """llama_run in a child process (a crash in its native code loses its column, not the run)."""
    child = subprocess.run([sys.executable, __file__, "--llamacpp-only", "--model", str(path), "--new-tokens", str(N),
                            "--prompt-ids", json.dumps(prompt)], capture_output=True, text=True)
    if child.returncode == 0 and child.stdout.strip():
        return json.loads(child.stdout.strip().splitlines()[-1]), "ran"
    return None, (f"crashed (signal {-child.returncode})" if child.returncode < 0 else
                  (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1])


def equal_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths (tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8, help="samples decoded together in the batched run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--prompt-ids", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    N = args.new_tokens
    if args.llamacpp_only:
        print(json.dumps(llamacpp_run(args.model, json.loads(args.prompt_ids), N)))
        return
    print(machine.line())
    path = resolve(args.model)
    tok = Tokenizer.load(path)
    model = load_model(path, quantize="auto")
    engines = {name: Engine(model, tok, max_batch=args.rows, kv_dtype=dtype) for name, dtype in CACHES.items()}
    figures: dict = {"machine": machine.describe(), "new_tokens": N, "rows": args.rows}
    print(f"{'prompt':>7} {'engine':<28}{'prefill tok/s':>14}{'B=1 tok/s':>11}{'B=' + str(args.rows) + ' tok/s':>11}")
    for length in args.lengths:
        prompt = long_prompt(tok, length)
        for engine in engines.values():  # warm-up: allocate the caches at this length
            engine.generate([prompt[:64]], SamplingParams(max_tokens=2, temperature=0))
        runs: dict[str, list[dict]] = {name: [] for name in [*CACHES, "llama.cpp"]}
        rows: dict[str, list[float]] = {name: [] for name in CACHES}
        status = "ran"
        for i in range(args.rounds):  # one of each per round, the order turning: the same phases of the machine
            order = [*CACHES, "llama.cpp"]
            for name in order[i % 3:] + order[: i % 3]:
                if name in engines:
                    runs[name].append(sputnik_run(engines[name], prompt, 1, N))
                    rows[name].append(sputnik_run(engines[name], prompt, args.rows, N)["decode"])
                elif status == "ran":
                    theirs, status = llamacpp_child(path, prompt, N)
                    if theirs is not None:
                        runs["llama.cpp"].append(theirs)
        batched = {name: statistics.median(r) for name, r in rows.items()}
        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode")}
               for name, rs in runs.items() if rs}
        for name in runs:
            if name not in med:
                print(f"{len(prompt):>7} {name:<28} {status}")
                continue
            label = f"sputnik, {name} cache" if name in CACHES else "llama.cpp, float16 cache"
            b8 = f"{batched[name]:>11.1f}" if name in batched else f"{'-':>11}"
            print(f"{len(prompt):>7} {label:<28}{med[name]['prefill']:>14.1f}{med[name]['decode']:>11.1f}{b8}")
        same = equal_prefix(runs["float32"][0]["tokens"], runs["bfloat16"][0]["tokens"])
        print(f"{len(prompt):>7} greedy tokens, bfloat16 cache = float32 cache before the first difference: "
              f"{same} of {N + 1}")
        print(f"{len(prompt):>7} greedy text, bfloat16 cache: {tok.decode(runs['bfloat16'][0]['tokens'])!r}")
        key = f"p{length}"
        figures.update({f"{key}_prompt_tokens": len(prompt), f"{key}_equal_greedy_tokens": same,
                        f"{key}_llamacpp": status})
        for name in CACHES:
            figures[f"{key}_{name}_b1_tok_s"] = round(med[name]["decode"], 2)
            figures[f"{key}_{name}_b{args.rows}_tok_s"] = round(batched[name], 2)
            figures[f"{key}_{name}_prefill_tok_s"] = round(med[name]["prefill"], 1)
        figures[f"{key}_bf16_vs_fp32_b1"] = round(med["bfloat16"]["decode"] / med["float32"]["decode"], 3)
        figures[f"{key}_bf16_vs_fp32_b{args.rows}"] = round(batched["bfloat16"] / batched["float32"], 3)
        if "llama.cpp" in med:
            for name in CACHES:  # per round: each against the llama.cpp run beside it
                ratios = [o["decode"] / t["decode"] for o, t in zip(runs[name], runs["llama.cpp"])]
                figures[f"{key}_{name}_vs_llamacpp"] = round(statistics.median(ratios), 3)
            figures[f"{key}_llamacpp_b1_tok_s"] = round(med["llama.cpp"]["decode"], 2)
            figures[f"{key}_llamacpp_prefill_tok_s"] = round(med["llama.cpp"]["prefill"], 1)
    cache = engines["float32"]._cache
    per_token = sum(b[0, ..., 0, :].numel() for b in cache.buffers())
    figures.update(cache_kb_per_token_float32=round(per_token * 4 / 1024, 1),
                   cache_kb_per_token_bfloat16=round(per_token * 2 / 1024, 1))
    print(f"cache per token: {per_token * 4 / 1024:.1f} KB float32, {per_token * 2 / 1024:.1f} KB bfloat16")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
