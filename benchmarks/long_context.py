"""Decoding after a long prompt: the KV cache's dtype (float32, bfloat16, float16) against llama.cpp's, one run.

The default model's Q4_1 GGUF, loaded as `sputnik chat` loads it (blocks kept, float32 around them): at a few
thousand cached tokens each decoded token reads the whole cache (SmolLM2-135M: 45 KB a token in float32, half that
in bfloat16 or float16) besides the 84 MB of weights, so the cache's dtype sets much of the step's cost. For each prompt length:
prefill tok/s, then decode tok/s after the prompt (from the first token on), B=1 greedy and B=8 sampled (eight
samples of the prompt: eight rows of the same length), for `--kv-dtype float32`, `bfloat16` and `float16`. llama.cpp
(llama-cpp-python, the bench extra; its default float16 cache) runs B=1 in a child process, in rounds that alternate
with sputnik's caches so all see the same phase of a noisy machine; the ratios are medians of the rounds'. The
quality check: greedy tokens with each 16-bit cache equal to the float32 cache's before they first differ.

Then a chat of `--turns` long user messages, each answered greedily (up to --new-tokens): the time to each turn's
first token, for the engine `sputnik chat` runs (the conversation's KV kept in its prefix cache, the cache's dtype
`--kv-dtype auto`), the same engine without a prefix cache (every turn prefills the whole conversation), and
llama.cpp (which evaluates only what follows the longest prefix its cache already holds), in alternating rounds.

Memory: in a fresh process each, sputnik (loaded as `sputnik chat` loads it) and llama.cpp read the longest prompt and
decode --new-tokens; resident MB above what the process held before loading (for sputnik: above torch), and
sputnik's KV cache's share of it.

    python benchmarks/long_context.py [--lengths 512 2048] [--new-tokens 64] [--rounds 3] [--turns 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import machine
from child import run_json
from decode import quantized_rss, rss_mb
from sputnik.checkpoint import load_model
from sputnik.checkpoint.args import ModelArgs
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.multiturn import chat_engine
from sputnik.tokenizer import Tokenizer

CACHES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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

    base = rss_mb()
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
    return {"prefill": len(prompt) / (first - start), "decode": (N + 1) / (end - first), "tokens": tokens,
            "rss_mb": rss_mb() - base}


TURN = ("Tell me more about the history of the old harbour town, its markets, its bridges and the people who lived "
        "along the river, and how the trade in salt and grain shaped its streets. ") * 3


def chat_turns(tok: Tokenizer, reply, turns: int) -> list[list[float]]:
    """A conversation of `turns` user messages, each answered by reply(ids) -> (text, seconds to its first token):
    [prompt tokens, time to first token] per turn."""
    messages, out = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn + 1}. {TURN}"})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        text, ttft = reply(ids)
        messages.append({"role": "assistant", "content": text})
        out.append([len(ids), ttft])
    return out


def sputnik_reply(engine: Engine, N: int):
    def reply(ids: list[int]) -> tuple[str, float]:
        start, first, text = time.perf_counter(), None, []
        for delta in engine.stream([ids], SamplingParams(max_tokens=N, temperature=0)):
            first = first or time.perf_counter() - start
            text.append(delta.text)
        return "".join(text), first
    return reply


def llamacpp_chat(path: str, N: int, turns: int) -> list[list[float]]:
    """chat_turns through llama.cpp, greedy, stopping at the tokenizer's stop tokens."""
    from llama_cpp import Llama

    tok = Tokenizer.load(path)
    llm = Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
    llm.eval(tok.encode("Hello", add_special_tokens=False))  # warm-up

    def reply(ids: list[int]) -> tuple[str, float]:
        start, first, out = time.perf_counter(), None, []
        for t in llm.generate(ids, temp=0.0):  # evaluates only what follows the longest prefix it holds
            first = first or time.perf_counter() - start
            if t in tok.stop_ids or len(out) == N:
                break
            out.append(t)
        return tok.decode(out), first

    return chat_turns(tok, reply, turns)


def llamacpp_child(path: Path, prompt: list[int], N: int, turns: int = 0) -> tuple[dict | list | None, str]:
    """llamacpp_run (or with turns, llamacpp_chat) in a child process (a crash in its native code loses its column,
    not the run)."""
    return run_json(__file__, "--llamacpp-only", "--model", str(path), "--new-tokens", str(N), "--prompt-ids",
                    json.dumps(prompt), "--turns", str(turns))


def equal_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths (tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8, help="samples decoded together in the batched run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=6, help="user messages in the chat (0: no chat)")
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child processes
    ap.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    N = args.new_tokens
    if args.llamacpp_only:
        print(json.dumps(llamacpp_chat(args.model, N, args.turns) if args.turns else
                         llamacpp_run(args.model, json.loads(args.prompt_ids), N)))
        return
    if args.rss_only:
        print(json.dumps(quantized_rss(args.model, json.loads(args.prompt_ids), N)))
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
            for name in order[i % len(order):] + order[: i % len(order)]:
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
        key = f"p{length}"
        figures.update({f"{key}_prompt_tokens": len(prompt), f"{key}_llamacpp": status})
        for name in ("bfloat16", "float16"):
            same = figures[f"{key}_{name}_equal_greedy_tokens"] = equal_prefix(runs["float32"][0]["tokens"],
                                                                               runs[name][0]["tokens"])
            print(f"{len(prompt):>7} greedy tokens, {name} cache = float32 cache before the first difference: "
                  f"{same} of {N + 1}")
        print(f"{len(prompt):>7} greedy text, float16 cache: {tok.decode(runs['float16'][0]['tokens'])!r}")
        for name in CACHES:
            figures[f"{key}_{name}_b1_tok_s"] = round(med[name]["decode"], 2)
            figures[f"{key}_{name}_b{args.rows}_tok_s"] = round(batched[name], 2)
            figures[f"{key}_{name}_prefill_tok_s"] = round(med[name]["prefill"], 1)
        for name, short in (("bfloat16", "bf16"), ("float16", "f16")):
            figures[f"{key}_{short}_vs_fp32_b1"] = round(med[name]["decode"] / med["float32"]["decode"], 3)
            figures[f"{key}_{short}_vs_fp32_b{args.rows}"] = round(batched[name] / batched["float32"], 3)
        if "llama.cpp" in med:
            for name in CACHES:  # per round: each against the llama.cpp run beside it
                ratios = [o["decode"] / t["decode"] for o, t in zip(runs[name], runs["llama.cpp"])]
                figures[f"{key}_{name}_vs_llamacpp"] = round(statistics.median(ratios), 3)
            figures[f"{key}_llamacpp_b1_tok_s"] = round(med["llama.cpp"]["decode"], 2)
            figures[f"{key}_llamacpp_prefill_tok_s"] = round(med["llama.cpp"]["prefill"], 1)
    memory(path, prompt, N, figures)
    if args.turns:
        chat(path, model, tok, args, figures)
    cache = engines["float32"]._cache
    per_token = sum(b[0, ..., 0, :].numel() for b in cache.buffers())
    figures.update(cache_kb_per_token_float32=round(per_token * 4 / 1024, 1),
                   cache_kb_per_token_16_bit=round(per_token * 2 / 1024, 1))
    print(f"cache per token: {per_token * 4 / 1024:.1f} KB float32, {per_token * 2 / 1024:.1f} KB in 16 bits")
    print(json.dumps(figures))


def memory(path: Path, prompt: list[int], N: int, figures: dict) -> None:
    """Resident memory after the longest prompt and N tokens, each side in a fresh process."""
    ours, why = run_json(__file__, "--rss-only", "--model", str(path), "--new-tokens", str(N), "--prompt-ids",
                       json.dumps(prompt))
    if ours is None:
        print(f"resident memory: sputnik's child failed: {why}")
        return
    theirs, status = llamacpp_child(path, prompt, N)
    line = f"resident MB after {len(prompt)} prompt tokens + {N}: sputnik {ours['q_rss_mb']:.1f} " \
           f"(its KV cache {ours['cache_mb']:.1f})"
    figures.update(rss_after_prompt_mb=round(ours["q_rss_mb"], 1), rss_cache_mb=round(ours["cache_mb"], 1))
    if theirs is not None:
        line += f", llama.cpp {theirs['rss_mb']:.1f}"
        figures.update(llamacpp_rss_after_prompt_mb=round(theirs["rss_mb"], 1),
                       rss_vs_llamacpp=round(ours["q_rss_mb"] / theirs["rss_mb"], 3))
    print(line if theirs is not None else f"{line}; llama.cpp: {status}")


def chat(path: Path, model, tok: Tokenizer, args, figures: dict) -> None:
    """The chat of --turns messages: time to each turn's first token, medians over alternating rounds."""
    N, kv_dtype = args.new_tokens, ModelArgs().cache_dtype(model)
    # `sputnik chat`'s engine (the cache's dtype as --kv-dtype auto picks it, one conversation's KV kept), and the
    # same without the prefix cache; a new engine each round, so each conversation starts cold
    engines = {"sputnik chat": lambda: chat_engine(model, tok, kv_dtype),
               "sputnik, no prefix cache": lambda: Engine(model, tok, kv_dtype=kv_dtype)}
    runs: dict[str, list[list[list[float]]]] = {name: [] for name in [*engines, "llama.cpp"]}
    status = "ran"
    for _ in range(args.rounds):
        for name, make in engines.items():
            runs[name].append(chat_turns(tok, sputnik_reply(make(), N), args.turns))
        if status == "ran":
            theirs, status = llamacpp_child(path, [], N, args.turns)
            if theirs is not None:
                runs["llama.cpp"].append(theirs)
    print(f"\nchat, {args.turns} turns: time to first token (s) per turn, median of {args.rounds} rounds "
          f"[prompt tokens]")
    for name, rs in runs.items():
        if not rs:
            print(f"{name:<26} {status}")
            continue
        ttft = [statistics.median(r[t][1] for r in rs) for t in range(args.turns)]
        lengths = [rs[0][t][0] for t in range(args.turns)]
        print(f"{name:<26} " + "  ".join(f"{s:.2f} [{n}]" for s, n in zip(ttft, lengths)))
        key = "chat_" + {"sputnik chat": "sputnik", "sputnik, no prefix cache": "no_prefix_cache"}.get(name, "llamacpp")
        figures[f"{key}_ttft_s"] = [round(x, 3) for x in ttft]
    figures["chat_llamacpp"] = status
    figures["chat_kv_dtype"] = str(kv_dtype).removeprefix("torch.")
    if runs["llama.cpp"]:
        figures["chat_last_ttft_vs_llamacpp"] = round(figures["chat_sputnik_ttft_s"][-1] /
                                                      figures["chat_llamacpp_ttft_s"][-1], 3)
    figures["chat_last_ttft_vs_no_prefix_cache"] = round(figures["chat_sputnik_ttft_s"][-1] /
                                                         figures["chat_no_prefix_cache_ttft_s"][-1], 3)


if __name__ == "__main__":
    main()
