"""Greedy agreement with llama.cpp: the default model's own GGUF, and the GGUF files `sputnik convert` writes.

1. The default model's Q4_1 file: sputnik (the file's blocks as they are, and dequantized to fp32; the KV cache as
   `--kv-dtype auto` keeps it: float16 under the blocks, as llama.cpp's) and llama.cpp greedy-decode `--new-tokens`
   tokens after each of 10 chat prompts; a prompt counts as equal when every token is.
2. The same model exported by sputnik (`export_gguf`, as `sputnik convert MODEL out.gguf --type T`): llama.cpp loads
   each file and greedy-decodes; compared with sputnik's greedy tokens on the same exported file, and with the source.
3. Every family sputnik exports (`--families`): a random two-layer model of each (Llama, Qwen2 with q/k/v bias, Qwen3
   with q/k norms, DeepSeek-V3 with MLA and routed experts as llama.cpp's deepseek2), the default model's tokenizer,
   written f16 and q8_0: llama.cpp's greedy tokens and last-prompt-position logits against sputnik's on the same file.

llama.cpp (llama-cpp-python, the bench extra) runs in a child process: a crash in its native code, or a file it
refuses, loses its column, not the run, and the table says why.

    python benchmarks/llamacpp_parity.py [--model smollm2-135m-instruct] [--new-tokens 32] [--types f16,q8_0,q4_0,q4_k]
                                         [--families llama,qwen2,qwen3,deepseek_v3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import machine
from child import run_json
from sputnik.checkpoint import load_model
from sputnik.checkpoint.args import ModelArgs
from sputnik.checkpoint.gguf_export import export_gguf
from sputnik.checkpoint.registry import resolve
from sputnik.config import ModelConfig
from sputnik.engine import Engine, SamplingParams
from sputnik.model import Transformer
from sputnik.tokenizer import Tokenizer

PROMPTS = ["What is 17 + 25? Explain step by step.", "Write a haiku about the sea.",
           "List three prime numbers and say why they are prime.", "What is the capital of France?",
           "Explain photosynthesis to a child.", "Give me a recipe for pancakes.", "How do I reverse a list in Python?",
           "Why is the sky blue?", "Translate 'good morning' into Spanish and French.", "서울은 어떤 도시인가요?"]


def llamacpp_greedy(path: str, prompts: list[list[int]], n: int, logits: bool = False) -> dict:
    """llama.cpp's greedy tokens after each prompt, and (logits) its logits at each prompt's last position."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, verbose=False)
    out: dict = {"tokens": [], "logits": []}
    for prompt in prompts:
        if logits:
            llm.reset()
            llm.eval(prompt)  # the last position's logits are what the context keeps
            row = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            out["logits"].append([round(float(x), 5) for x in row])
        llm.reset()
        tokens = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            tokens.append(int(t))
            if len(tokens) == n:
                break
        out["tokens"].append(tokens)
    return out


def in_child(path: Path, prompts: list[list[int]], n: int, logits: bool = False) -> tuple[dict | None, str]:
    """llama.cpp's greedy tokens (and logits) from a child process, or None and why."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        return run_json(__file__, "--llamacpp-only", "--model", str(path), "--new-tokens", str(n), "--prompts", f.name,
                         *(["--logits"] if logits else []))
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


def random_model(family: str, vocab: int) -> Transformer:
    """A random two-layer model of `family` at unit gain (matrices std 1/sqrt(fan-in), norms near 1: logits spread
    about 1, so greedy ties are rare); DeepSeek-V3's second layer routes 2 of 4 experts in 2 groups."""
    kw: dict = dict(family=family, vocab_size=vocab, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=256,
                    max_seq_len=512, tie_embeddings=True)
    if family == "qwen2":
        kw.update(qkv_bias=True, tie_embeddings=False)
    elif family == "qwen3":
        kw.update(qk_norm=True, head_dim=64)
    elif family == "deepseek_v3":
        kw.update(n_kv_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                  v_head_dim=32, n_routed_experts=4, n_shared_experts=1, moe_inter_dim=128, n_activated_experts=2,
                  first_k_dense_replace=1, n_group=2, topk_group=1, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def last_logits(model: Transformer, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p]))[0, -1].float() for p in prompts]


def rel_diffs(a: list, b: list) -> list[float]:
    """Relative L2 distance of each prompt's logits, a from b, sorted."""
    return sorted(float((torch.as_tensor(x) - torch.as_tensor(y)).norm() / torch.as_tensor(y).norm())
                  for x, y in zip(a, b))


def families(names: list[str], tok: Tokenizer, prompts: list[list[int]], n: int) -> dict[str, dict]:
    """Each family's random model written f16 and q8_0: llama.cpp against sputnik on the same file; for q8_0 also
    llama.cpp's own distance from its f16 file's logits (what its 8-bit rounding moves)."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in names:
            model, f16 = random_model(family, len(tok)), None
            for kind in ("f16", "q8_0"):
                out = Path(tmp) / f"{family}-{kind}.gguf"
                summary = export_gguf(model, tok, out, kind)
                ours = load_model(out, quantize="auto")
                mine = sputnik_greedy(ours, tok, prompts, n)
                theirs, status = in_child(out, prompts, n, logits=True)
                row = {"llamacpp": status, "sputnik blocks": agreement(mine, theirs and theirs["tokens"])}
                if theirs is not None:
                    gaps = rel_diffs(last_logits(ours, prompts), theirs["logits"])
                    row.update(logits_rel_diff_median=round(gaps[len(gaps) // 2], 5),
                               logits_rel_diff_max=round(gaps[-1], 5))
                    if f16 is not None:
                        own = rel_diffs(theirs["logits"], f16)
                        row["llamacpp_vs_its_f16_median"] = round(own[len(own) // 2], 5)
                    f16 = f16 or theirs["logits"]
                rows[f"{family} ({summary.arch}) {kind}"] = row
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k", help="export types to run in llama.cpp")
    ap.add_argument("--families", default="llama,qwen2,qwen3,deepseek_v3",
                    help="random models of these families, exported f16 and q8_0 ('' skips them)")
    ap.add_argument("--llamacpp-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--logits", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.new_tokens
    if args.llamacpp_only:
        print(json.dumps(llamacpp_greedy(args.model, json.loads(Path(args.prompts).read_text()), n, args.logits)))
        return

    path = resolve(args.model)
    tok = Tokenizer.load(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in PROMPTS]
    rows = shipped_and_exports(path, args.types.split(","), tok, prompts, n)
    kin = families([f for f in args.families.split(",") if f], tok, prompts, n)
    report(rows, kin, n)


def shipped_and_exports(path: Path, kinds: list[str], tok: Tokenizer, prompts: list[list[int]],
                        n: int) -> dict[str, dict]:
    """The shipped file (its blocks, and dequantized) and its exports against llama.cpp."""
    dense = load_model(path)
    rows: dict[str, dict] = {}
    ours = {"blocks": sputnik_greedy(load_model(path, quantize="auto"), tok, prompts, n),
            "fp32": sputnik_greedy(dense, tok, prompts, n)}
    theirs, status = in_child(path, prompts, n)
    theirs = theirs and theirs["tokens"]
    rows[f"{path.name} (as shipped)"] = {"llamacpp": status, "sputnik blocks": agreement(ours["blocks"], theirs),
                                         "sputnik fp32": agreement(ours["fp32"], theirs)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            out = Path(tmp) / f"export-{kind}.gguf"
            export_gguf(dense, tok, out, kind)
            mine = sputnik_greedy(load_model(out, quantize="auto"), tok, prompts, n)
            theirs, status = in_child(out, prompts, n)
            rows[f"sputnik convert --type {kind}"] = {"llamacpp": status,
                                                      "sputnik blocks": agreement(mine, theirs and theirs["tokens"]),
                                                      "source fp32": agreement(mine, ours["fp32"]),
                                                      "mb": round(out.stat().st_size / 2**20, 1)}
    return rows


def report(rows: dict[str, dict], kin: dict[str, dict], n: int) -> None:
    print(f"\ngreedy agreement with llama.cpp, {len(PROMPTS)} prompts x {n} tokens (all equal / prompts)")
    print(machine.line())
    print(f"{'file':<34}{'llama.cpp':>12}{'vs sputnik':>12}{'vs fp32':>10}  tokens equal before a difference")

    def cell(a):
        return f"{a['equal']}/{a['of']}" if a else "-"

    for name, r in rows.items():
        fp32 = r.get("sputnik fp32") or r.get("source fp32")
        pre = (r["sputnik blocks"] or {}).get("prefix", "")
        print(f"{name:<34}{r['llamacpp'][:12]:>12}{cell(r['sputnik blocks']):>12}{cell(fp32):>10}  {pre}")
    if kin:
        print(f"\n{'random 2-layer model, exported':<34}{'llama.cpp':>12}{'vs sputnik':>12}"
              f"{'logits diff: median, max':>26}{'llama.cpp vs its f16':>22}  tokens equal before a difference")
        for name, r in kin.items():
            diff = f"{r['logits_rel_diff_median']}, {r['logits_rel_diff_max']}" if "logits_rel_diff_max" in r else "-"
            own = r.get("llamacpp_vs_its_f16_median", "")
            pre = (r["sputnik blocks"] or {}).get("prefix", "")
            print(f"{name:<34}{r['llamacpp'][:12]:>12}{cell(r['sputnik blocks']):>12}{diff:>26}{own:>22}  {pre}")
    shipped = next(iter(rows.values()))
    figures = {"new_tokens": n, "prompts": len(PROMPTS), "llamacpp": shipped["llamacpp"],
               "gguf_equal_vs_llamacpp": (shipped["sputnik blocks"] or {}).get("equal"),
               "gguf_fp32_equal_vs_llamacpp": (shipped["sputnik fp32"] or {}).get("equal"),
               "exports": {k.split()[-1]: {"llamacpp": r["llamacpp"],
                                           "equal_vs_llamacpp": (r["sputnik blocks"] or {}).get("equal"),
                                           "equal_vs_source_fp32": r["source fp32"]["equal"], "mb": r["mb"]}
                           for k, r in list(rows.items())[1:]},
               "families": {k: {"equal_vs_llamacpp": (r["sputnik blocks"] or {}).get("equal"),
                                **{f: v for f, v in r.items() if f != "sputnik blocks"}} for k, r in kin.items()},
               "machine": machine.describe()}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
