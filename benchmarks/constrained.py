"""Grammar-constrained decoding (json_schema) against the same requests unconstrained, in one run: tokens/s at B=1 and
B=16 on the default model, the per-step mask cost, and the compile time of each schema (cold, then cached).

The timed schema is a long array of short free strings that no row completes within the token budget, so constrained
and free rows produce the same number of tokens and the ratio is the per-token cost of the grammar (masks over the
whole vocabulary inside strings, the dearest case). Free and constrained runs alternate, medians taken, so load on a
shared machine hits both alike. Goal (issue 17): at most 10% slower per token.

    python benchmarks/constrained.py [--model smollm2-135m-instruct] [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import machine
import torch

from sputnik.checkpoint import load_model
from sputnik.checkpoint.registry import resolve
from sputnik.engine import Engine, SamplingParams
from sputnik.engine.grammar import Constraint
from sputnik.serve.protocol import ChatCompletionRequest, parse_request
from sputnik.serve.tools import output_constraint, tool_plan
from sputnik.tokenizer import Tokenizer

NOTES = {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 200}
STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string"}},
         "required": ["title", "story"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                    "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query"]}}} for i in range(8)]


def run(engine: Engine, prompts: list[list[int]], runs: dict[str, SamplingParams], repeats: int
        ) -> dict[str, tuple[float, float]]:
    """Per named params: (median tokens/s, mean tokens per row), the runs alternating."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    lens: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, params in runs.items():
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            dt = time.perf_counter() - t
            n = [len(c.token_ids) for row in outs for c in row]
            rates[name].append(sum(n) / dt)
            lens[name].append(sum(n) / len(n))
    return {k: (statistics.median(rates[k]), statistics.mean(lens[k])) for k in runs}


def compile_times(engine: Engine, tok: Tokenizer) -> dict[str, tuple[float, float]]:
    """Per constraint: (first compile ms, cached ms) of a fresh matcher."""
    req = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                                                "tool_choice": "required"})
    constraints = {"json_object": Constraint.json_schema({"type": "object"}),
                   "person schema": Constraint.json_schema(PERSON),
                   "story schema": Constraint.json_schema(STORY),
                   "8 tools, required (Hermes)": output_constraint(req, tool_plan(req, tok), tok, False)}
    out = {}
    for name, c in constraints.items():
        t = time.perf_counter()
        engine.grammars.matcher(c)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        engine.grammars.matcher(c)
        out[name] = (cold * 1e3, (time.perf_counter() - t) * 1e3)
    return out


def mask_ms(engine: Engine, rows: int, repeats: int = 20) -> float:
    """Median ms to compute one step's masks for `rows` constrained rows (mid-string, the common case)."""
    m = engine.grammars.matcher(Constraint.json_schema(STORY))
    for t in engine.tokenizer.encode('{"title": "A day", "story": "Once'):
        m.consume_token(t)
    matchers = [m.deep_copy() for _ in range(rows)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.grammars.masks(matchers).result()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    path = resolve(args.model)
    tok = Tokenizer.load(path)
    engine = Engine(load_model(path, dtype=torch.float32), tok, max_batch=16)
    t = time.perf_counter()
    engine.grammars  # noqa: B018 — the tokenizer's trie, built once per engine
    tokenizer_s = time.perf_counter() - t
    compiled = compile_times(engine, tok)

    N = args.new_tokens
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List {i + 20} things about the sea, as a JSON "
                                         "array of strings."}], tokenize=True) for i in range(16)]
    runs = {"free": SamplingParams(max_tokens=N, temperature=0.8, seed=1, ignore_eos=True),
            "json_schema": SamplingParams(max_tokens=N, temperature=0.8, seed=1,
                                          constraint=Constraint.json_schema(NOTES))}
    engine.generate(prompts[:2], runs["json_schema"])  # warm up
    results = {}
    for B in (1, 16):
        results[B] = {**run(engine, prompts[:B], runs, args.repeats), "mask_ms": mask_ms(engine, B)}

    print(f"\nSmolLM2-135M fp32, up to {N} new tokens, median of {args.repeats}; {torch.get_num_threads()} threads")
    print(machine.line())
    print(f"grammar tokenizer (once per engine): {tokenizer_s * 1e3:.0f} ms")
    print(f"{'constraint':<30}{'compile ms':>12}{'cached ms':>12}")
    for name, (cold, warm) in compiled.items():
        print(f"{name:<30}{cold:>12.2f}{warm:>12.3f}")
    print(f"\n{'batch':<8}{'free tok/s':>12}{'json tok/s':>12}{'ratio':>8}{'tokens/row':>12}{'mask ms/step':>14}")
    for B, r in results.items():
        print(f"B={B:<6}{r['free'][0]:>12.1f}{r['json_schema'][0]:>12.1f}{r['json_schema'][0] / r['free'][0]:>8.2f}"
              f"{r['json_schema'][1]:>12.1f}{r['mask_ms']:>14.2f}")
    figures = {"machine": machine.describe(), "grammar_tokenizer_ms": round(tokenizer_s * 1e3, 1),
               "compile_ms": {k: round(v[0], 2) for k, v in compiled.items()},
               "cached_ms": {k: round(v[1], 3) for k, v in compiled.items()}}
    for B, r in results.items():
        figures.update({f"b{B}_free_tok_s": round(r["free"][0], 2), f"b{B}_json_tok_s": round(r["json_schema"][0], 2),
                        f"b{B}_json_vs_free": round(r["json_schema"][0] / r["free"][0], 3),
                        f"b{B}_mask_ms": round(r["mask_ms"], 3)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
