"""Serving under load: TTFT, inter-token latency and aggregate tokens/s at 1, 4, 16 and 64 concurrent streams, for
`sputnik serve` and (when llama-cpp-python[server] is installed) llama.cpp's server on the same Q4_1 file.

Each level runs its streams twice: all at once (aggregate tok/s) and arriving uniformly over --spread seconds
(TTFT while other streams are decoding: new prompts must be prefilled between decode steps, not queued behind them).
Every stream asks for --new-tokens tokens with ignore_eos, so all servers do the same work.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--levels 1 4 16 64] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

import machine
from sputnik.checkpoint.registry import resolve
from sputnik.device import pick_device, pick_dtype

QUESTIONS = [f"Explain, step by step, how to add {a} and {b}." for a, b in zip(range(11, 999, 7), range(997, 9, -5))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    # The server's log goes to a file: an unread pipe fills up and blocks a chatty server (llama.cpp's) mid-start.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{cmd[0:4]} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd[0:4]} did not start in {timeout} s")


async def one_stream(client: httpx.AsyncClient, url: str, model: str, i: int, new_tokens: int, delay: float) -> dict:
    await asyncio.sleep(delay)
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": new_tokens, "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                d = c.get("delta") or {}
                if d.get("content") or d.get("reasoning_content"):
                    stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - sent, "itl": statistics.mean(gaps) if gaps else 0.0, "tokens": tokens or len(stamps),
            "end": time.perf_counter()}


async def level(url: str, model: str, n: int, new_tokens: int, spread: float) -> list[dict]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        delays = [spread * i / max(1, n - 1) if spread else 0.0 for i in range(n)]
        return await asyncio.gather(*(one_stream(client, url, model, i, new_tokens, d) for i, d in enumerate(delays)))


def measure(url: str, model: str, levels: list[int], new_tokens: int, spread: float) -> dict:
    asyncio.run(level(url, model, 2, 8, 0))  # warm up
    out = {}
    for n in levels:
        t = time.perf_counter()
        burst = asyncio.run(level(url, model, n, new_tokens, 0))
        wall = max(r["end"] for r in burst) - t
        row = {"agg_tok_s": sum(r["tokens"] for r in burst) / wall,
               "ttft_p50_s": statistics.median(r["ttft"] for r in burst),
               "ttft_p95_s": statistics.quantiles([r["ttft"] for r in burst], n=20)[-1] if n > 1 else burst[0]["ttft"],
               "itl_ms": 1000 * statistics.median(r["itl"] for r in burst)}
        if n > 1 and spread:
            arriving = asyncio.run(level(url, model, n, new_tokens, spread))
            row["ttft_p50_arriving_s"] = statistics.median(r["ttft"] for r in arriving)
        out[n] = row
        print(f"  {n:>3} streams: {row['agg_tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.3f} s  "
              f"p95 {row['ttft_p95_s']:.3f} s  ITL {row['itl_ms']:.1f} ms"
              + (f"  TTFT p50 arriving over {spread:g} s: {row['ttft_p50_arriving_s']:.3f} s" if n > 1 and spread
                 else ""), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spread", type=float, default=4.0, help="seconds over which a level's streams arrive")
    ap.add_argument("--dtype", default="auto", help="sputnik's weights: auto (serve's default: bf16 on AMX CPUs and "
                    "GPUs, else float32), float32 or bfloat16")
    args = ap.parse_args()
    args.dtype = str(pick_dtype(args.dtype, pick_device("auto"))).removeprefix("torch.")  # what the server will use
    gguf = resolve(args.model)
    results: dict[str, dict] = {}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "sputnik.cli", "serve", "--model", args.model, "--served-name", "m",
                  "--port", str(port), "--no-auth", "--rate-limit", "0", "--max-batch", str(max(args.levels)),
                  "--max-queue", "1000", "--log-level", "warning", "--dtype", args.dtype, "--no-web"], url)
    try:
        print(f"sputnik serve ({args.dtype})")
        results["sputnik"] = measure(url, "m", args.levels, args.new_tokens, args.spread)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llama_cpp.server") is None:
        print("llama.cpp: llama-cpp-python[server] not installed (pip install -e '.[bench]'); column skipped")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                      "--n_ctx", "4096", "--model_alias", "m"], url)
        try:
            print("llama.cpp server")
            results["llama.cpp"] = measure(url, "m", args.levels, args.new_tokens, args.spread)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    s = results["sputnik"]
    print(f"\n{'server':<10} {'streams':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL ms':>7}")
    for name, rows in results.items():
        for n, r in rows.items():
            print(f"{name:<10} {n:>7} {r['agg_tok_s']:8.1f} {r['ttft_p50_s']:9.3f} {r['ttft_p95_s']:9.3f} "
                  f"{r['itl_ms']:7.1f}")
    print(machine.line())
    figures = {"machine": machine.describe(), "new_tokens": args.new_tokens,
               "spread_s": args.spread, "dtype": args.dtype}
    for name, rows in results.items():
        tag = "" if name == "sputnik" else "llamacpp_"
        for n, r in rows.items():
            for k, v in r.items():
                figures[f"{tag}{k}_{n}"] = round(v, 4)
    if 1 in s and 16 in s:
        figures["agg16_vs_1"] = round(s[16]["agg_tok_s"] / s[1]["agg_tok_s"], 2)
        figures["ttft_p50_1_s"] = round(s[1]["ttft_p50_s"], 4)
        figures["ttft_p50_16_s"] = round(s[16]["ttft_p50_s"], 4)
        figures["ttft_arriving16_vs_1"] = round(s[16]["ttft_p50_arriving_s"] / s[1]["ttft_p50_s"], 2)
    if "llama.cpp" in results and 16 in results["llama.cpp"]:
        figures["agg16_vs_llamacpp"] = round(s[16]["agg_tok_s"] / results["llama.cpp"][16]["agg_tok_s"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
