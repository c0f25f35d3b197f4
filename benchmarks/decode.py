"""Decode speed of the default model (SmolLM2-135M, fp32): sputnik against transformers and llama.cpp, in one run.

B=1 greedy and B=32 sampled, 128 new tokens each. Ceilings measured in the same run: at B=1 decoding reads every
weight once per token (memory bandwidth / weight bytes); at B=32 it is arithmetic (matmul rate / 2·params per token).

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sputnik.checkpoint import load_model
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.tokenizer import Tokenizer

QUESTIONS = [f"What is {a} + {b}? Explain step by step." for a, b in zip(range(11, 99, 3), range(97, 9, -3))]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (read + write) of a buffer far larger than the caches."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), repeats)
    return 2 * a.numel() * 4 / t / 1e9


def matmul_gflops(model_dim: int, inter: int, batch: int = 32, repeats: int = 20) -> float:
    """fp32 matmul rate at the decode shape: [batch, dim] x [dim, inter] weights, as the MLP runs them."""
    x, w = torch.randn(batch, model_dim), torch.randn(inter, model_dim)
    for _ in range(3):
        x @ w.T
    n = 50
    t = median_time(lambda: [x @ w.T for _ in range(n)], repeats)
    return 2 * batch * model_dim * inter * n / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    N, B = args.new_tokens, args.batch
    torch.manual_seed(0)

    path = resolve(args.model)
    tok = Tokenizer.load(path)
    model = load_model(path, dtype=torch.float32)
    params_count = sum(p.numel() for p in model.parameters())
    weight_bytes = params_count * 4
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS[:B]]
    while len(chats) < B:
        chats += chats[: B - len(chats)]
    engine = Engine(model, tok, max_batch=B)
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=N, temperature=0.7, top_p=0.95, ignore_eos=True, seed=0)
    engine.generate(chats[:1], SamplingParams(max_tokens=8, temperature=0))  # warm up
    results: dict[str, dict[str, float]] = {"sputnik": {}}
    results["sputnik"]["b1"] = N / median_time(lambda: engine.generate(chats[:1], greedy), args.repeats)
    results["sputnik"]["b32"] = B * N / median_time(lambda: engine.generate(chats, sampled), args.repeats)

    try:
        import transformers

        gguf = Path(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        hf.eval()
        pad = tok.pad_id

        def hf_generate(prompts, sample: bool) -> None:
            L = max(map(len, prompts))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
            kw = dict(do_sample=True, temperature=0.7, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad, **kw)
            assert out.shape[1] == L + N

        hf_generate(chats[:1], False)
        results["transformers"] = {
            "b1": N / median_time(lambda: hf_generate(chats[:1], False), args.repeats),
            "b32": B * N / median_time(lambda: hf_generate(chats, True), args.repeats),
        }
    except ImportError:
        print("transformers not installed: no anchor")

    try:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

        def llama_generate() -> None:
            llm.reset()
            n = 0
            for _ in llm.generate(chats[0], temp=0.0):
                n += 1
                if n == N:
                    break

        llama_generate()
        results["llama.cpp (Q4_1)"] = {"b1": N / median_time(llama_generate, args.repeats)}
    except ImportError:
        print("llama-cpp-python not installed (pip install -e '.[bench]'): llama.cpp column skipped")

    bw = memory_bandwidth_gbs()
    gflops = matmul_gflops(model.cfg.dim, model.cfg.inter_dim, B)
    ceiling_b1 = bw * 1e9 / weight_bytes
    ceiling_b32 = gflops * 1e9 / (2 * params_count)

    print(f"\nSmolLM2-135M fp32, {N} new tokens, median of {args.repeats}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"ceilings: B=1 {ceiling_b1:.1f} tok/s ({bw:.1f} GB/s / {weight_bytes / 1e6:.0f} MB),"
          f" B={B} {ceiling_b32:.1f} tok/s ({gflops:.1f} GFLOP/s / {2 * params_count / 1e9:.2f} GFLOP)")
    print(f"{'engine':<20}{'B=1 tok/s':>12}{'of ceiling':>12}{f'B={B} tok/s':>13}{'of ceiling':>12}")
    for name, r in results.items():
        b32 = r.get("b32")
        b32s = f"{b32:>13.1f}{b32 / ceiling_b32:>12.0%}" if b32 else f"{'-':>13}{'-':>12}"
        print(f"{name:<20}{r['b1']:>12.1f}{r['b1'] / ceiling_b1:>12.0%}{b32s}")
    figures = {
        "sputnik_b1_tok_s": round(results["sputnik"]["b1"], 2),
        "sputnik_b32_tok_s": round(results["sputnik"]["b32"], 2),
        "b1_of_ceiling": round(results["sputnik"]["b1"] / ceiling_b1, 3),
        "b32_of_ceiling": round(results["sputnik"]["b32"] / ceiling_b32, 3),
        "ceiling_b1_tok_s": round(ceiling_b1, 2),
        "ceiling_b32_tok_s": round(ceiling_b32, 2),
        "bandwidth_gb_s": round(bw, 2),
        "matmul_gflop_s": round(gflops, 2),
    }
    if "transformers" in results:
        t = results["transformers"]
        figures.update(transformers_b1_tok_s=round(t["b1"], 2), transformers_b32_tok_s=round(t["b32"], 2),
                       b1_vs_transformers=round(results["sputnik"]["b1"] / t["b1"], 3),
                       b32_vs_transformers=round(results["sputnik"]["b32"] / t["b32"], 3))
    if "llama.cpp (Q4_1)" in results:
        figures["llamacpp_b1_tok_s"] = round(results["llama.cpp (Q4_1)"]["b1"], 2)
        figures["b1_vs_llamacpp"] = round(results["sputnik"]["b1"] / results["llama.cpp (Q4_1)"]["b1"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
