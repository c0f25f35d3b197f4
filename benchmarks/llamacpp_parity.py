"""Greedy agreement with llama.cpp: the default model's own GGUF, and the GGUF files `sputnik convert` writes.

1. The default model's Q4_1 file: sputnik (the file's blocks as they are, and dequantized to fp32; the KV cache as
   `--kv-dtype auto` keeps it: float16 under the blocks, as llama.cpp's) and llama.cpp greedy-decode `--new-tokens`
   tokens after each of 10 chat prompts; a prompt counts as equal when every token is.
2. The same model exported by sputnik (`export_gguf`, as `sputnik convert MODEL out.gguf --type T`): llama.cpp loads
   each file and greedy-decodes; compared with sputnik's greedy tokens on the same exported file, and with the source.

llama.cpp (llama-cpp-python, the bench extra) runs in a child process: a crash in its native code, or a file it
refuses, loses its column, not the run, and the table says why.

    python benchmarks/llamacpp_parity.py [--model smollm2-135m-instruct] [--new-tokens 32] [--types f16,q8_0,q4_0,q4_k]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import machine
from child import run_json
from sputnik.checkpoint import load_model
from sputnik.checkpoint.args import ModelArgs
from sputnik.checkpoint.gguf_export import export_gguf
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.tokenizer import Tokenizer

PROMPTS = ["What is 17 + 25? Explain step by step.", "Write a haiku about the sea.",
           "List three prime numbers and say why they are prime.", "What is the capital of France?",
           "Explain photosynthesis to a child.", "Give me a recipe for pancakes.", "How do I reverse a list in Python?",
           "Why is the sky blue?", "Translate 'good morning' into Spanish and French.", "서울은 어떤 도시인가요?"]


def llamacpp_greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    out = []
    for prompt in prompts:
        llm.reset()
        tokens = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            tokens.append(int(t))
            if len(tokens) == n:
                break
        out.append(tokens)
    return out


def in_child(path: Path, prompts: list[list[int]], n: int) -> tuple[list[list[int]] | None, str]:
    """llama.cpp's greedy tokens from a child process, or None and why."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        return run_json(__file__, "--llamacpp-only", "--model", str(path), "--new-tokens", str(n), "--prompts", f.name)
    finally:
        Path(f.name).unlink()


def sputnik_greedy(model, tok, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens from the engine `sputnik generate` builds (its KV cache as --kv-dtype auto picks it)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine = Engine(model, tok, kv_dtype=ModelArgs().cache_dtype(model))
    return [c[0].token_ids for c in engine.generate(prompts, params)]


def agreement(a: list[list[int]] | None, b: list[list[int]] | None) -> dict | None:
    """Prompts whose tokens are all equal, and per prompt the tokens equal before the first difference."""
    if a is None or b is None:
        return None
    prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)]
    return {"equal": sum(p == q for p, q in zip(a, b)), "of": len(a), "prefix": prefix}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k", help="export types to run in llama.cpp")
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.new_tokens
    if args.llamacpp_only:
        print(json.dumps(llamacpp_greedy(args.model, json.loads(Path(args.prompts).read_text()), n)))
        return

    path = resolve(args.model)
    tok = Tokenizer.load(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in PROMPTS]
    dense = load_model(path)
    rows: dict[str, dict] = {}
    ours = {"blocks": sputnik_greedy(load_model(path, quantize="auto"), tok, prompts, n),
            "fp32": sputnik_greedy(dense, tok, prompts, n)}
    theirs, status = in_child(path, prompts, n)
    rows[f"{path.name} (as shipped)"] = {"llamacpp": status, "sputnik blocks": agreement(ours["blocks"], theirs),
                                         "sputnik fp32": agreement(ours["fp32"], theirs)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            out = Path(tmp) / f"export-{kind}.gguf"
            export_gguf(dense, tok, out, kind)
            mine = sputnik_greedy(load_model(out, quantize="auto"), tok, prompts, n)
            theirs, status = in_child(out, prompts, n)
            rows[f"sputnik convert --type {kind}"] = {"llamacpp": status, "sputnik blocks": agreement(mine, theirs),
                                                      "source fp32": agreement(mine, ours["fp32"]),
                                                      "mb": round(out.stat().st_size / 2**20, 1)}

    print(f"\ngreedy agreement with llama.cpp, {len(PROMPTS)} prompts x {n} tokens (all equal / prompts)")
    print(machine.line())
    print(f"{'file':<34}{'llama.cpp':>12}{'vs sputnik':>12}{'vs fp32':>10}  tokens equal before a difference")

    def cell(a):
        return f"{a['equal']}/{a['of']}" if a else "-"

    for name, r in rows.items():
        fp32 = r.get("sputnik fp32") or r.get("source fp32")
        pre = (r["sputnik blocks"] or {}).get("prefix", "")
        print(f"{name:<34}{r['llamacpp'][:12]:>12}{cell(r['sputnik blocks']):>12}{cell(fp32):>10}  {pre}")
    shipped = next(iter(rows.values()))
    figures = {"new_tokens": n, "prompts": len(PROMPTS), "llamacpp": shipped["llamacpp"],
               "gguf_equal_vs_llamacpp": (shipped["sputnik blocks"] or {}).get("equal"),
               "gguf_fp32_equal_vs_llamacpp": (shipped["sputnik fp32"] or {}).get("equal"),
               "exports": {k.split()[-1]: {"llamacpp": r["llamacpp"],
                                           "equal_vs_llamacpp": (r["sputnik blocks"] or {}).get("equal"),
                                           "equal_vs_source_fp32": r["source fp32"]["equal"], "mb": r["mb"]}
                           for k, r in list(rows.items())[1:]},
               "machine": machine.describe()}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
