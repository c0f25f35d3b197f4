"""Decode speed of the default model (SmolLM2-135M, fp32 and its GGUF's own Q4_1/Q8_0 blocks): sputnik against
transformers and llama.cpp, in one run.

B=1 greedy and B=32 sampled, 128 new tokens each, for sputnik's engine eager (the default) and with its compiled decode
step (`--compile`; the compile itself is timed apart), fp32 and quantized alike. Ceilings measured in the same run: at B=1 decoding reads every
weight once per token (memory bandwidth / weight bytes); at B=32 it is arithmetic (matmul rate / 2·params per token).

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--repeats 3] [--new-tokens 128] [--no-compile]

"sputnik Q4_1" runs the file's blocks as they are (sputnik.kernels), each decode step one native call
(engine/native.py); "sputnik Q4_1 pytorch step" runs the same blocks through the eager PyTorch step. "sputnik" (fp32)
takes the native step too (float32 rows as type F32), "sputnik pytorch step" the eager one; "sputnik bf16" is the model
in bfloat16 (what `--dtype auto` loads where the CPU has AVX512-BF16 or AMX) through the native step (BF16 rows,
float32 activations), "sputnik bf16 pytorch step" the same through the eager step (bf16_b1_of_ceiling: against twice
the fp32 ceiling, its weights being half the bytes). The native-step engines keep the KV cache `sputnik generate`
keeps (`--kv-dtype auto`: float16 under the blocks, the model's dtype otherwise); the PyTorch-step ones the model's
dtype. Its memory (q_rss_mb: resident MB after loading
the model and tokenizer and decoding 8 tokens, less the process's RSS after importing torch) is measured in a child
process, so the fp32 copies here do not count; q_rss_vs_gguf is that less its KV cache over the file's size (the issue's
measure), and llamacpp_rss_mb the same resident MB for llama.cpp on the file (n_ctx 512). llama.cpp
(llama-cpp-python, the bench extra) runs in a child process too, in rounds that alternate with sputnik's Q4_1 engine
(q_b1_vs_llamacpp: the median of the rounds' ratios); when it is not installed or crashes the table says why and
llamacpp_b1_tok_s / q_b1_vs_llamacpp are null.
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
from sputnik.checkpoint import load_model
from sputnik.checkpoint.args import ModelArgs
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.tokenizer import Tokenizer

QUESTIONS = [f"What is {a} + {b}? Explain step by step." for a, b in zip(range(11, 99, 3), range(97, 9, -3))]


def chat_prompts(tok: Tokenizer, B: int) -> list[list[int]]:
    """B chat prompts of the questions (again from the first past the last)."""
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS[:B]]
    while len(chats) < B:
        chats += chats[: B - len(chats)]
    return chats


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


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantized_rss(path: str, prompt: list[int], new_tokens: int = 8) -> dict[str, float]:
    """RSS (MB) of a fresh process that loads the model quantized (as `sputnik chat` does), reads the prompt and
    decodes new_tokens, and of torch alone; and the KV cache's MB."""
    base = rss_mb()
    model = load_model(path, quantize="auto")
    engine = Engine(model, Tokenizer.load(path), kv_dtype=ModelArgs().cache_dtype(model))
    engine.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    total = rss_mb()
    cache = sum(t.numel() * t.element_size() for t in engine._cache.buffers()) / 2**20
    return {"rss_mb": total, "torch_mb": base, "q_rss_mb": total - base, "cache_mb": cache}


def transformers_rates(path: Path, pad: int, chats: list[list[int]], N: int, repeats: int, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The anchor: transformers' generate on the same GGUF (dequantized by its loader), B=1 greedy and B=len(chats)
    sampled tok/s, rows left-padded."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device)
    hf.eval()

    def generate(prompts, sample: bool) -> None:
        L = max(map(len, prompts))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
        kw = dict(do_sample=True, temperature=0.7, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad, **kw)
        assert out.shape[1] == L + N
        if device != "cpu":
            torch.cuda.synchronize()

    generate(chats[:1], False)
    return {"b1": N / median_time(lambda: generate(chats[:1], False), repeats),
            "b32": len(chats) * N / median_time(lambda: generate(chats, True), repeats)}


def llamacpp_b1(path: str, prompt: list[int], N: int, repeats: int) -> dict[str, float]:
    """llama.cpp's B=1 greedy tok/s on the file, and its resident MB above the imports (n_ctx 512: a small cache)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python not installed (pip install -e '.[bench]')") from None
    base = rss_mb()
    llm = Llama(model_path=path, n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def generate() -> None:
        llm.reset()
        for n, _ in enumerate(llm.generate(prompt, temp=0.0), 1):
            if n == N:
                break

    generate()
    rss = rss_mb() - base  # resident after load and one generation, as quantized_rss measures sputnik
    return {"b1": N / median_time(generate, repeats), "rss_mb": rss}


def llamacpp_child(path: Path, N: int, prompt: list[int]) -> tuple[dict | None, str]:
    """One timed llama.cpp generation (after a warm-up) in a child process: its figures, or None and why not."""
    return run_json(__file__, "--llamacpp-only", "--model", str(path), "--new-tokens", str(N), "--repeats", "1",
                    "--prompt-ids", json.dumps(prompt))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine (saves its compile)")
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--prompt-ids", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.rss_only:
        print(json.dumps(quantized_rss(args.model, json.loads(args.prompt_ids))))
        return
    if args.llamacpp_only:
        print(json.dumps(llamacpp_b1(args.model, json.loads(args.prompt_ids), args.new_tokens, args.repeats)))
        return
    N, B = args.new_tokens, args.batch
    torch.manual_seed(0)

    path = resolve(args.model)
    tok = Tokenizer.load(path)
    model = load_model(path, dtype=torch.float32)
    params_count = sum(p.numel() for p in model.parameters())
    weight_bytes = params_count * 4
    chats = chat_prompts(tok, B)
    greedy = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=N, temperature=0.7, top_p=0.95, ignore_eos=True, seed=0)
    results: dict[str, dict[str, float]] = {}
    compile_s = None
    qmodel = load_model(path, quantize="auto") if path.suffix == ".gguf" else None
    bmodel = load_model(path, dtype=torch.bfloat16)  # what --dtype auto loads on a CPU with AVX512-BF16 or AMX
    q_compile_s = None
    compiled = [] if args.no_compile else ["sputnik --compile"]
    # "sputnik Q4_1" decodes with the native step (engine/native.py), "... pytorch step" with the eager PyTorch one
    runs = ["sputnik", "sputnik pytorch step"] + compiled + ["sputnik bf16", "sputnik bf16 pytorch step"]
    runs += ["sputnik Q4_1", "sputnik Q4_1 pytorch step"] + [c.replace("sputnik", "sputnik Q4_1") for c in compiled] \
        if qmodel else []
    engines: dict[str, Engine] = {}
    for name in runs:
        weights = qmodel if "Q4_1" in name else bmodel if "bf16" in name else model
        native, jit = not name.endswith("pytorch step"), name.endswith("compile")
        # the KV cache `sputnik generate` keeps (--kv-dtype auto: float16 under blocks the native step runs)
        engine = engines[name] = Engine(weights, tok, max_batch=B, compile=jit, native=native,
                                        kv_dtype=ModelArgs().cache_dtype(weights, jit) if native else None)
        t = time.perf_counter()
        for prompts in (chats[:1], chats[:2]):  # warm up (and compile: one graph for one row, one for several)
            engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
        if name == "sputnik --compile":
            compile_s = time.perf_counter() - t
        elif name.endswith("compile"):
            q_compile_s = time.perf_counter() - t
        results[name] = {"b1": N / median_time(lambda: engine.generate(chats[:1], greedy), args.repeats),
                         "b32": B * N / median_time(lambda: engine.generate(chats, sampled), args.repeats)}

    try:
        results["transformers"] = transformers_rates(path, tok.pad_id, chats, N, args.repeats)
    except ImportError:
        print("transformers not installed: no anchor")

    # llama.cpp runs in a child process: a crash in its native code (seen with a locally built llama-cpp-python)
    # loses its column, not the run. It and sputnik's Q4_1 engine (the native step) take turns, one timed generation
    # each per round, so both see the same phase of a noisy machine: q_b1_vs_llamacpp is the median of the rounds'
    # ratios (run one after the other, 20 minutes apart, the two moved by up to 1.5x on the EPYC).
    rounds: list[tuple[float | None, dict]] = []
    llamacpp_status = "ran"
    for _ in range(args.repeats):
        theirs, llamacpp_status = llamacpp_child(path, N, chats[0])
        if theirs is None:
            print(f"llama.cpp column skipped: {llamacpp_status}")
            break
        q_engine = engines.get("sputnik Q4_1")
        ours = N / median_time(lambda: q_engine.generate(chats[:1], greedy), 1) if q_engine else None
        rounds.append((ours, theirs))
    if rounds:
        results["llama.cpp (Q4_1)"] = {"b1": statistics.median(t["b1"] for _, t in rounds),
                                       "rss_mb": rounds[0][1]["rss_mb"]}
        print("B=1 rounds, sputnik Q4_1 / llama.cpp tok/s: " +
              ", ".join(f"{o:.1f} / {t['b1']:.1f}" if o else f"- / {t['b1']:.1f}" for o, t in rounds))

    memory = None
    if qmodel is not None:
        memory, _ = run_json(__file__, "--rss-only", "--model", str(path), "--prompt-ids", json.dumps(chats[0]))

    bw = memory_bandwidth_gbs()
    gflops = matmul_gflops(model.cfg.dim, model.cfg.inter_dim, B)
    ceiling_b1 = bw * 1e9 / weight_bytes
    ceiling_b32 = gflops * 1e9 / (2 * params_count)

    print(f"\nSmolLM2-135M fp32, {N} new tokens, median of {args.repeats}; "
          f"{torch.get_num_threads()} threads")
    print(machine.line())
    print(f"ceilings: B=1 {ceiling_b1:.1f} tok/s ({bw:.1f} GB/s / {weight_bytes / 1e6:.0f} MB),"
          f" B={B} {ceiling_b32:.1f} tok/s ({gflops:.1f} GFLOP/s / {2 * params_count / 1e9:.2f} GFLOP)")
    if compile_s is not None:
        print(f"compiled decode: {compile_s:.0f} s to compile and warm up (once a process; graphs are cached on disk)")
    if q_compile_s is not None:
        print(f"compiled quantized decode: {q_compile_s:.0f} s to compile and warm up")
    if memory:
        print(f"quantized: {memory['q_rss_mb']:.0f} MB resident after load + 8 tokens (above torch's "
              f"{memory['torch_mb']:.0f} MB), {memory['cache_mb']:.0f} MB of it KV cache; the GGUF file is "
              f"{path.stat().st_size / 2**20:.0f} MB")
    if "rss_mb" in results.get("llama.cpp (Q4_1)", {}):
        print(f"llama.cpp: {results['llama.cpp (Q4_1)']['rss_mb']:.0f} MB resident after load + one generation")
    print(f"{'engine':<24}{'B=1 tok/s':>12}{'of ceiling':>12}{f'B={B} tok/s':>13}{'of ceiling':>12}")
    for name, r in results.items():
        b32 = r.get("b32")
        b32s = f"{b32:>13.1f}{b32 / ceiling_b32:>12.0%}" if b32 else f"{'-':>13}{'-':>12}"
        print(f"{name:<24}{r['b1']:>12.1f}{r['b1'] / ceiling_b1:>12.0%}{b32s}")
    if "llama.cpp (Q4_1)" not in results:
        print(f"{'llama.cpp (Q4_1)':<24}{'-':>12}  did not run: {llamacpp_status}")
    figures = {
        "machine": machine.describe(),
        "sputnik_b1_tok_s": round(results["sputnik"]["b1"], 2),
        "sputnik_b32_tok_s": round(results["sputnik"]["b32"], 2),
        "b1_of_ceiling": round(results["sputnik"]["b1"] / ceiling_b1, 3),
        "b32_of_ceiling": round(results["sputnik"]["b32"] / ceiling_b32, 3),
        "pytorch_step_b1_tok_s": round(results["sputnik pytorch step"]["b1"], 2),
        "pytorch_step_b32_tok_s": round(results["sputnik pytorch step"]["b32"], 2),
        "pytorch_step_b1_of_ceiling": round(results["sputnik pytorch step"]["b1"] / ceiling_b1, 3),
        "ceiling_b1_tok_s": round(ceiling_b1, 2),
        "ceiling_b32_tok_s": round(ceiling_b32, 2),
        "bandwidth_gb_s": round(bw, 2),
        "matmul_gflop_s": round(gflops, 2),
    }
    if "sputnik Q4_1" in results:
        # q_* take the faster quantized engine per column (compiled where measured), as the fp32 ratios below do
        quant = [r for n, r in results.items() if "Q4_1" in n and n.startswith("sputnik")]
        q = {k: max(r[k] for r in quant) for k in ("b1", "b32")}
        figures.update(q_eager_b1_tok_s=round(results["sputnik Q4_1"]["b1"], 2),
                       q_eager_b32_tok_s=round(results["sputnik Q4_1"]["b32"], 2),
                       q_pytorch_step_b1_tok_s=round(results["sputnik Q4_1 pytorch step"]["b1"], 2),
                       q_pytorch_step_b32_tok_s=round(results["sputnik Q4_1 pytorch step"]["b32"], 2))
        if q_compile_s is not None:
            c = results["sputnik Q4_1 --compile"]
            figures.update(q_compiled_b1_tok_s=round(c["b1"], 2), q_compiled_b32_tok_s=round(c["b32"], 2),
                           q_compile_s=round(q_compile_s, 1))
        figures.update(q_b1_tok_s=round(q["b1"], 2), q_b32_tok_s=round(q["b32"], 2),
                       q_b1_vs_fp32=round(q["b1"] / results["sputnik"]["b1"], 3),
                       q_b32_vs_fp32=round(q["b32"] / results["sputnik"]["b32"], 3),
                       gguf_mb=round(path.stat().st_size / 2**20, 1))
        if memory:
            gguf_mb = path.stat().st_size / 2**20
            figures.update(q_rss_mb=round(memory["q_rss_mb"], 1), q_rss_total_mb=round(memory["rss_mb"], 1),
                           q_cache_mb=round(memory["cache_mb"], 1),
                           q_rss_vs_gguf=round((memory["q_rss_mb"] - memory["cache_mb"]) / gguf_mb, 3))
        paired = [o / t["b1"] for o, t in rounds if o]
        figures["q_b1_vs_llamacpp"] = round(statistics.median(paired), 3) if paired else None
        figures["q_b1_vs_llamacpp_rounds"] = [round(r, 3) for r in paired]
    figures["llamacpp"] = llamacpp_status  # "ran", or why it did not: then its figures are null
    figures["llamacpp_b1_tok_s"] = figures["llamacpp_rss_mb"] = None
    # The *_vs_* ratios take sputnik's faster engine per column (compiled where measured); *_eager_* the default.
    fp32 = [r for n, r in results.items() if n in ("sputnik", "sputnik pytorch step", "sputnik --compile")]
    best = {k: max(r[k] for r in fp32) for k in ("b1", "b32")}
    bf16, bf16_step = results["sputnik bf16"], results["sputnik bf16 pytorch step"]
    figures.update(bf16_b1_tok_s=round(bf16["b1"], 2), bf16_b32_tok_s=round(bf16["b32"], 2),
                   bf16_b1_of_ceiling=round(bf16["b1"] / (2 * ceiling_b1), 3),  # half the bytes: twice the ceiling
                   bf16_pytorch_step_b1_tok_s=round(bf16_step["b1"], 2),
                   bf16_pytorch_step_b32_tok_s=round(bf16_step["b32"], 2),
                   bf16_b1_vs_fp32=round(bf16["b1"] / results["sputnik"]["b1"], 3),
                   bf16_b32_vs_fp32=round(bf16["b32"] / results["sputnik"]["b32"], 3))
    if compile_s is not None:
        c = results["sputnik --compile"]
        figures.update(sputnik_compiled_b1_tok_s=round(c["b1"], 2), sputnik_compiled_b32_tok_s=round(c["b32"], 2),
                       compiled_b1_of_ceiling=round(c["b1"] / ceiling_b1, 3), compile_s=round(compile_s, 1))
    if "transformers" in results:
        t = results["transformers"]
        figures.update(transformers_b1_tok_s=round(t["b1"], 2), transformers_b32_tok_s=round(t["b32"], 2),
                       b1_vs_transformers=round(best["b1"] / t["b1"], 3),
                       b32_vs_transformers=round(best["b32"] / t["b32"], 3),
                       b1_eager_vs_transformers=round(results["sputnik"]["b1"] / t["b1"], 3),
                       b32_eager_vs_transformers=round(results["sputnik"]["b32"] / t["b32"], 3))
    if "llama.cpp (Q4_1)" in results:
        figures["llamacpp_b1_tok_s"] = round(results["llama.cpp (Q4_1)"]["b1"], 2)
        figures["llamacpp_rss_mb"] = round(results["llama.cpp (Q4_1)"]["rss_mb"], 1)
        figures["b1_vs_llamacpp"] = round(best["b1"] / results["llama.cpp (Q4_1)"]["b1"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
